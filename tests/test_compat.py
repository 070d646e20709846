"""The cache reaches the model under the name the installed transformers uses (``cache`` since 5.24,
``past_key_values`` before), so the library's own calls raise no deprecation warning."""

from __future__ import annotations

import inspect
import warnings

from conftest import prompt

from kvevict import EvictionCache, with_cache
from kvevict.compat import cache_keyword
from kvevict.evaluate import prefill


def test_cache_keyword_is_a_parameter_of_forward(llama, gemma):
    for model in (llama, gemma):
        assert cache_keyword(model) in inspect.signature(model.forward).parameters
        assert set(with_cache(model, None)) == {cache_keyword(model)}


def test_library_calls_raise_no_deprecation_warning(llama):
    cache = EvictionCache(llama, "snapkv", budget=16, slack=0, sinks=2, recent=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        prefill(llama, prompt(40), cache, chunk=16)
        llama.generate(prompt(40)[:, :1], **with_cache(llama, EvictionCache(llama, budget=64)), do_sample=False,
                       max_new_tokens=3)
    assert cache.get_seq_length() == 40 and cache.stats()["evicted"] > 0
