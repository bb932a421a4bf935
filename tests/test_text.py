"""Prompt encoding on tiny random-weight text stacks in the official miniFLUX / SD3 layouts."""
import logging
import shutil
from pathlib import Path

import pytest
import sentencepiece
import torch
from transformers import CLIPTokenizer, T5Tokenizer

from model_core.text import (
    T5_MAX_LENGTH,
    FluxPromptEncoder,
    PromptEmbeddings,
    SD3PromptEncoder,
    load_prompt_encoder,
)
from training.tiny_text import write_tiny_text_stack

FAMILIES = ("miniflux", "sd3")
PROMPTS = ["a cat", "a drone shot of snowy mountains at sunrise, cinematic lighting", ""]


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("text_stacks")
    return {family: (root / family, write_tiny_text_stack(root / family, family)) for family in FAMILIES}


def _copy(stacks, family, tmp_path) -> Path:
    return Path(shutil.copytree(stacks[family][0], tmp_path / family))


def _count_forwards(encoder) -> list[str]:
    calls = []
    for name, module in encoder.encoders.items():
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_stack_matches_official_layout(stacks, family):
    root, info = stacks[family]
    assert sorted(path.name for path in root.iterdir()) == sorted(
        info["folders"] + [name.replace("text_encoder", "tokenizer") for name in info["folders"]]
    )
    assert sum(path.stat().st_size for path in root.rglob("*") if path.is_file()) < 5_000_000
    t5_tokenizer = T5Tokenizer.from_pretrained(root / info["folders"][-1].replace("text_encoder", "tokenizer"))
    assert (t5_tokenizer.pad_token_id, t5_tokenizer.eos_token_id, t5_tokenizer.unk_token_id) == (0, 1, 2)
    clip_tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    ids = clip_tokenizer("a cat").input_ids
    assert ids[0] == clip_tokenizer.bos_token_id and ids[-1] == clip_tokenizer.eos_token_id and len(ids) > 2
    assert (root / "tokenizer" / "vocab.json").is_file() and (root / "tokenizer" / "merges.txt").is_file()
    assert info["joint_attention_dim"] == 32
    assert info["pooled_projection_dim"] == 16 * (1 if family == "miniflux" else 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_shapes_and_right_padded_mask(stacks, family):
    root, info = stacks[family]
    encoder = load_prompt_encoder(root)
    assert type(encoder) is {"miniflux": FluxPromptEncoder, "sd3": SD3PromptEncoder}[family]
    embeddings = encoder.encode(PROMPTS)
    assert embeddings.hidden_states.shape == (3, T5_MAX_LENGTH, info["joint_attention_dim"])
    assert embeddings.pooled.shape == (3, info["pooled_projection_dim"])
    assert embeddings.attention_mask.dtype == torch.long
    t5_tokenizer = encoder.tokenizers[encoder.t5_folder]
    for prompt, mask in zip(PROMPTS, embeddings.attention_mask):
        valid = len(t5_tokenizer(prompt).input_ids)
        assert mask.tolist() == [1] * valid + [0] * (T5_MAX_LENGTH - valid)


def test_batching_does_not_change_valid_states(stacks):
    encoder = load_prompt_encoder(stacks["sd3"][0])
    batch = encoder.encode(PROMPTS)
    alone = encoder.encode(PROMPTS[1])
    valid = alone.attention_mask[0].bool()
    torch.testing.assert_close(batch.hidden_states[1][valid], alone.hidden_states[0][valid])
    torch.testing.assert_close(batch.pooled[1], alone.pooled[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_outputs(stacks, family):
    encoder = load_prompt_encoder(stacks[family][0], family, torch_dtype=torch.bfloat16)
    embeddings = encoder.encode(PROMPTS)
    assert embeddings.hidden_states.dtype == embeddings.pooled.dtype == torch.bfloat16
    assert embeddings.attention_mask.dtype == torch.long
    assert torch.isfinite(embeddings.hidden_states.float()).all()


def test_empty_prompt_is_encoded_once_per_device_and_dtype(stacks):
    encoder = load_prompt_encoder(stacks["miniflux"][0])
    calls = _count_forwards(encoder)
    first = encoder.encode_negative(None, batch=2)
    assert len(calls) == 2
    second = encoder.encode_negative("", batch=3)
    assert len(calls) == 2
    reference = encoder.encode("")
    torch.testing.assert_close(second.hidden_states, reference.hidden_states.repeat(3, 1, 1))
    torch.testing.assert_close(first.pooled, reference.pooled.repeat(2, 1))
    calls.clear()
    assert encoder.to(dtype=torch.bfloat16).encode_negative(None, batch=1).pooled.dtype == torch.bfloat16
    assert len(calls) == 2


def test_negative_prompt_text_is_encoded(stacks):
    encoder = load_prompt_encoder(stacks["sd3"][0])
    negative = encoder.encode_negative("blurry, low quality", batch=2)
    expected = encoder.encode(["blurry, low quality"] * 2)
    torch.testing.assert_close(negative.hidden_states, expected.hidden_states)
    torch.testing.assert_close(negative.pooled, expected.pooled)


def test_same_seed_gives_identical_files_and_embeddings(stacks, tmp_path):
    root, _ = stacks["miniflux"]
    write_tiny_text_stack(tmp_path / "again", "miniflux")
    write_tiny_text_stack(tmp_path / "other", "miniflux", seed=1)
    for path in root.rglob("*"):
        if path.is_file():
            assert (tmp_path / "again" / path.relative_to(root)).read_bytes() == path.read_bytes(), path
    embeddings = [load_prompt_encoder(folder).encode(PROMPTS) for folder in (root, tmp_path / "again", tmp_path / "other")]
    torch.testing.assert_close(embeddings[0].hidden_states, embeddings[1].hidden_states, rtol=0, atol=0)
    assert not torch.allclose(embeddings[0].hidden_states, embeddings[2].hidden_states)


def test_long_prompt_is_truncated_with_a_warning(stacks, caplog):
    encoder = load_prompt_encoder(stacks["miniflux"][0])
    with caplog.at_level(logging.WARNING, logger="model_core.text"):
        embeddings = encoder.encode(["a cat", "a cat sitting on a red sofa " * 40])
    assert embeddings.attention_mask[1].sum() == T5_MAX_LENGTH
    assert any("text_encoder_2" in message and "first 128" in message for message in caplog.messages)
    assert all("Prompt 1 " not in message for message in caplog.messages)


def test_family_detection(stacks, tmp_path):
    assert isinstance(load_prompt_encoder(stacks["miniflux"][0]), FluxPromptEncoder)
    assert isinstance(load_prompt_encoder(stacks["sd3"][0]), SD3PromptEncoder)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        load_prompt_encoder(tmp_path)
    with pytest.raises(ValueError, match="miniflux"):
        load_prompt_encoder(stacks["sd3"][0], "flux-dev")


def test_missing_subfolder_is_named(stacks, tmp_path):
    root = _copy(stacks, "sd3", tmp_path)
    shutil.rmtree(root / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match=r"tokenizer_2.*text_encoder_3/ \+ tokenizer_3/"):
        load_prompt_encoder(root, "sd3")


def test_missing_tokenizer_file_is_named(stacks, tmp_path):
    root = _copy(stacks, "miniflux", tmp_path)
    for name in ("spiece.model", "tokenizer.json"):
        (root / "tokenizer_2" / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer_2 lacks tokenizer.json or spiece.model"):
        load_prompt_encoder(root)


def test_missing_weights_are_named(stacks, tmp_path):
    root = _copy(stacks, "miniflux", tmp_path)
    (root / "text_encoder_2" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"text_encoder_2 lacks model.safetensors"):
        load_prompt_encoder(root)


@pytest.mark.parametrize("prompts", [[], None, ["ok", 3]])
def test_invalid_prompts_are_rejected(stacks, prompts):
    encoder = load_prompt_encoder(stacks["miniflux"][0])
    with pytest.raises(ValueError, match="prompt"):
        encoder.encode(prompts)


def test_writing_over_an_existing_stack_is_refused(stacks):
    with pytest.raises(FileExistsError, match="fresh folder"):
        write_tiny_text_stack(stacks["miniflux"][0], "miniflux")


def test_embeddings_move_between_devices(stacks):
    embeddings = load_prompt_encoder(stacks["miniflux"][0]).encode("a cat", device=torch.device("meta"))
    assert isinstance(embeddings, PromptEmbeddings)
    assert embeddings.hidden_states.is_meta and embeddings.pooled.is_meta and embeddings.attention_mask.is_meta


def test_raw_tokenizer_files_alone_give_the_same_tokens(stacks, tmp_path):
    root = _copy(stacks, "miniflux", tmp_path)
    for folder in ("tokenizer", "tokenizer_2"):
        (root / folder / "tokenizer.json").unlink()
    prompts = ["A cat, sitting! zebra ünï 42", "the quick brown fox", ""]
    expected = load_prompt_encoder(stacks["miniflux"][0]).encode(prompts)
    embeddings = load_prompt_encoder(root).encode(prompts)
    assert torch.equal(embeddings.attention_mask, expected.attention_mask)
    torch.testing.assert_close(embeddings.hidden_states, expected.hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(embeddings.pooled, expected.pooled, rtol=0, atol=0)


def test_t5_tokenizer_keeps_corpus_words_whole_as_sentencepiece_does(tmp_path):
    """A small corpus's words are single pieces (a unigram trainer made them characters), case is folded (as
    the CLIP tokenizer does), and `transformers` segments exactly as SentencePiece does."""
    corpus = [f"a {color} {shape} moving {direction}" for color in ("red", "magenta", "cyan")
              for shape in ("circle", "square", "triangle") for direction in ("left", "up")]
    write_tiny_text_stack(tmp_path / "stack", corpus=corpus)
    tokenizer = T5Tokenizer.from_pretrained(tmp_path / "stack" / "tokenizer_2")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "stack" / "tokenizer_2" / "spiece.model"))
    assert tokenizer.tokenize("a magenta square moving left") == ["▁a", "▁magenta", "▁square", "▁moving", "▁left"]
    for text in ("a cyan triangle moving up", "a purple dog jumps", "magentas squared", "A Red Circle moving UP"):
        assert tokenizer(text).input_ids == processor.encode(text) + [tokenizer.eos_token_id]
    assert tokenizer("A Red Circle moving UP").input_ids == tokenizer("a red circle moving up").input_ids  # case folded
