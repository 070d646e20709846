import torch
torch.set_num_threads(1)
d = torch.load("/tmp/s23/dump.pt")
for (seed, li), (lb, k, start, L) in sorted(d.items()):
    T = lb.numel()
    nov = -torch.nn.functional.cosine_similarity(k, k.mean(0, keepdim=True), dim=-1)
    def pct(s):
        r = s.argsort(descending=True).argsort().float() / T
        return " ".join(f"{100*r[j]:.0f}" for j in range(start - 6, start + L))
    z = lambda x: (x - x.mean()) / x.std()
    print(f"s{seed} L{li}  lb:   {pct(lb)}")
    print(f"        nov:  {pct(nov)}")
    print(f"        z+z:  {pct(z(lb) + z(nov))}")
    print(f"        loglb:{pct(-(-lb).log())}")
