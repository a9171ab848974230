"""chatsft.families: which preset a config points to."""

from __future__ import annotations

import pytest

from chatsft.errors import ConfigError
from chatsft.families import detect_family, family_preset, resolve_preset


def test_family_detection():
    assert detect_family("yuan") == "yuan2"
    assert detect_family("baichuan", vocab_size=125696) == "baichuan2"
    assert detect_family("baichuan", vocab_size=64000) == "baichuan"
    assert (
        detect_family("baichuan", name_or_path="/models/Baichuan2-13B-Chat", vocab_size=None) == "baichuan2"
    )
    assert detect_family("baichuan", name_or_path="/models/Baichuan-13B-Chat", vocab_size=None) == "baichuan"
    assert detect_family("llama", name_or_path="/models/vicuna-7b") == "none"
    with pytest.raises(ConfigError, match="cannot tell Baichuan from Baichuan2"):
        detect_family("baichuan", name_or_path="/models/my-finetune", vocab_size=70000)
    assert family_preset("baichuan").template == "baichuan-chat"
    assert family_preset("Baichuan2").template == "baichuan2-chat"
    assert family_preset("baichuan2").special_tokens == []
    with pytest.raises(ConfigError, match="unknown model family 'falcon'; choose one of yuan2, baichuan"):
        family_preset("falcon")

    class Config:
        model_type, vocab_size = "baichuan", 125696

    assert resolve_preset(Config()).name == "baichuan2"
    assert resolve_preset(Config(), model_family="baichuan").name == "baichuan"
