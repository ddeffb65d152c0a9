"""T5 text conditioning from a local folder (a tiny random T5 made here; no download)."""

import pytest
import torch

import var_core
from var_core import text


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("tiny_t5")
    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "dog", "cat", "sharp", "ünïcode"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(folder)
    return folder


def test_encode_packs_valid_tokens(t5_folder):
    enc = text.T5TextEncoder.from_folder(t5_folder)
    cond = enc.encode(["a photo of dog", "cat"])
    assert cond.lens == (5, 2)  # words + </s>
    assert cond.kv_compact.shape == (7, 32)
    single = enc.encode(["cat"])
    torch.testing.assert_close(single.kv_compact, cond.kv_compact[5:])


def test_cache_and_long_prompt(t5_folder):
    enc = text.T5TextEncoder.from_folder(t5_folder)
    calls = []
    enc.encoder.register_forward_hook(lambda *a: calls.append(1))
    enc.encode(["dog"])
    enc.encode(["dog"])
    assert len(calls) == 1
    long = enc.encode([" ".join(["dog"] * 10_000)])
    assert long.lens == (text.MAX_LENGTH,)
    assert enc.encode(["ünïcode"]).lens == (2,)


def test_empty_prompt_is_refused_for_t5_and_unconditional_used(t5_folder):
    enc = text.T5TextEncoder.from_folder(t5_folder)
    with pytest.raises(ValueError, match="unconditional"):
        enc.encode([""])
    uncond = torch.randn(512, 32)
    cond = text.unconditional(uncond, batch=2)
    assert cond.lens == (1, 1) and torch.equal(cond.kv_compact[1], uncond[0])


@pytest.mark.reliability
def test_missing_folder_and_tokenizer(tmp_path, t5_folder):
    with pytest.raises(var_core.CheckpointError, match="text_encoders"):
        text.T5TextEncoder.from_folder(tmp_path / "flan-t5-xl")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((t5_folder / "config.json").read_text())
    with pytest.raises(var_core.CheckpointError, match="tokenizer"):
        text.T5TextEncoder.from_folder(broken)
