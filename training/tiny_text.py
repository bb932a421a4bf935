"""Small random-weight text stacks (encoders + tokenizers) in the official checkpoint layout, built offline."""
import io
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import sentencepiece
from sentencepiece import sentencepiece_model_pb2
import torch
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from model_core.init import reinitialize

DEFAULT_CORPUS = (
    "a cat sitting on a red sofa in the afternoon sun",
    "the quick brown fox jumps over the lazy dog",
    "a drone shot of snowy mountains at sunrise, cinematic lighting",
    "waves crashing on a rocky beach under a cloudy sky",
    "a busy city street at night with neon signs and rain",
    "an astronaut walking slowly on the surface of the moon",
    "a close-up of a hummingbird drinking from a purple flower",
    "a steaming cup of coffee on a wooden table next to a book",
    "a golden retriever running through a field of tall grass",
    "timelapse of clouds moving over a green valley",
    "a sailboat gliding across a calm blue lake in summer",
    "a little girl blowing out candles on her birthday cake",
    "a train passing through a forest in autumn, leaves falling",
    "fireworks exploding over a river during a festival",
    "a chef slicing vegetables in a bright modern kitchen",
    "an old lighthouse standing on a cliff during a storm",
    "a panda eating bamboo in a misty bamboo forest",
    "a vintage car driving along a coastal road at sunset",
    "slow motion of a drop of water falling into a glass",
    "a robot painting a portrait in an art studio, 4k, highly detailed",
)
T5_MODEL_MAX_LENGTH = 512
CLIP_MAX_POSITIONS = 77
CLIP_SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                       "pad_token": "<|endoftext|>"}
T5_SPECIAL_TOKENS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def write_tiny_text_stack(root, family="miniflux", *, t5_dim=32, clip_dim=16, seed=0, corpus=None) -> dict:
    """Write tiny CLIP (+CLIP) + T5 encoders and tokenizers under `root` in the official subfolders."""
    if family not in ("miniflux", "sd3"):
        raise ValueError(f"family must be 'miniflux' or 'sd3', got {family!r}.")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    corpus = list(corpus or DEFAULT_CORPUS)
    clip_files, t5_files = clip_tokenizer_files(corpus), t5_tokenizer_files(corpus)
    clip_folders = ("text_encoder",) if family == "miniflux" else ("text_encoder", "text_encoder_2")
    clip_class = CLIPTextModel if family == "miniflux" else CLIPTextModelWithProjection
    for index, folder in enumerate(clip_folders):
        tokenizer = _write_tokenizer(root, folder, CLIPTokenizer, clip_files, CLIP_SPECIAL_TOKENS, CLIP_MAX_POSITIONS)
        _write_encoder(root, folder, _seeded(seed + index, clip_class, _tiny_clip_config(tokenizer, clip_dim)))
    t5_folder = f"text_encoder_{len(clip_folders) + 1}"
    tokenizer = _write_tokenizer(root, t5_folder, T5Tokenizer, t5_files, T5_SPECIAL_TOKENS, T5_MODEL_MAX_LENGTH)
    _write_encoder(root, t5_folder, _seeded(seed + len(clip_folders), T5EncoderModel, _tiny_t5_config(tokenizer, t5_dim)))
    return {
        "family": family,
        "folders": [*clip_folders, t5_folder],
        "joint_attention_dim": t5_dim,
        "pooled_projection_dim": clip_dim * len(clip_folders),
    }


def t5_tokenizer_files(corpus) -> dict[str, bytes]:
    """`spiece.model` of a T5-style SentencePiece unigram model (pad 0, </s> 1, <unk> 2) over `corpus`.

    SentencePiece's unigram trainer collapses a small corpus to single characters, so the pieces come from its
    BPE trainer (which keeps the corpus's frequent words whole) and every piece gets the same score: the
    unigram segmentation is then the one with the fewest pieces, in SentencePiece and in `transformers` alike.
    Text is case-folded, as the CLIP tokenizer lowercases: `A Red Circle` gives the pieces of `a red circle`.
    """
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=256,
        normalization_rule_name="nmt_nfkc_cf",
        hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    for piece in proto.pieces:
        if piece.type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL:
            piece.score = -1.0
    return {"spiece.model": proto.SerializeToString()}


def clip_tokenizer_files(corpus, num_merges=400) -> dict[str, bytes]:
    """`vocab.json` + `merges.txt` of a CLIP-style byte-level BPE (`</w>` word ends) learned on `corpus`."""
    splitter = CLIPTokenizer().backend_tokenizer
    words = Counter()
    for line in corpus:
        for piece, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(line)):
            words[(*piece[:-1], piece[-1] + "</w>")] += 1
    merges = learn_bpe_merges(words, num_merges)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + ["".join(pair) for pair in merges]
    vocab = {}
    for token in tokens + [CLIP_SPECIAL_TOKENS["bos_token"], CLIP_SPECIAL_TOKENS["eos_token"]]:
        vocab.setdefault(token, len(vocab))
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False).encode(),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode(),
    }


def learn_bpe_merges(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself)."""
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        words = Counter({_merge_pair(word, best): count for word, count in words.items()})
    return merges


def _merge_pair(word: tuple, pair: tuple) -> tuple:
    merged, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def _tiny_clip_config(tokenizer, dim) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=2 * dim, projection_dim=dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_POSITIONS,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_t5_config(tokenizer, dim) -> T5Config:
    return T5Config(
        vocab_size=len(tokenizer), d_model=dim, d_kv=dim // 4, d_ff=2 * dim, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )


def _seeded(seed, model_class, config):
    """Build a randomly initialised model drawn from `seed` (a torch.Generator; the global RNG is not seeded)."""
    return reinitialize(model_class(config), torch.Generator().manual_seed(seed)).eval()


def _write_tokenizer(root: Path, encoder_folder, tokenizer_class, files, special_tokens, model_max_length):
    """Write the tokenizer beside `encoder_folder` (raw files + tokenizer.json/config) and return it loaded."""
    def write(folder):
        for name, data in {**files, "special_tokens_map.json": json.dumps(special_tokens).encode()}.items():
            Path(folder, name).write_bytes(data)
        tokenizer_class.from_pretrained(folder, model_max_length=model_max_length).save_pretrained(folder)

    target = _write_folder(root / encoder_folder.replace("text_encoder", "tokenizer"), write)
    return tokenizer_class.from_pretrained(target)


def _write_encoder(root: Path, encoder_folder: str, encoder) -> None:
    _write_folder(root / encoder_folder, lambda folder: encoder.save_pretrained(folder, safe_serialization=True))


def _write_folder(target: Path, write) -> Path:
    """Run `write(temporary_folder)` and rename the folder to `target`, which must not exist yet."""
    if target.exists():
        raise FileExistsError(f"{target} already exists; write the tiny text stack into a fresh folder.")
    staging = tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        write(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
