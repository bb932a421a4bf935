"""The data order at scale: the seeded bijection, the shuffled streams, the jsonl byte-offset index."""
import json
import pickle
import time

import numpy as np
import pytest

from training.annotation_index import AnnotationIndex, index_folder
from training.packing import BatchPlanner, ShuffledStream
from training.permutation import Permutation

OBJECTIVE = {"stages": 3, "history_noise_max": 1 / 3, "text_dropout": 0.1}


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 1000, 1025])
def test_permutation_is_a_bijection(n):
    order = Permutation(n, [0, 1, 2])(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))


def test_permutation_is_seeded_and_constant_time():
    n = 10_000
    a, b = Permutation(n, [0, 0, 0])(np.arange(n)), Permutation(n, [0, 0, 1])(np.arange(n))
    assert np.array_equal(a, Permutation(n, [0, 0, 0])(np.arange(n))) and not np.array_equal(a, b)
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05  # shuffled, not a shifted identity
    huge = Permutation(10**12, [0, 0, 0])  # no array of n elements is ever made
    started = time.perf_counter()
    picked = huge(np.arange(768))
    assert time.perf_counter() - started < 0.5 and len(set(picked.tolist())) == 768 and picked.max() < 10**12
    with pytest.raises(ValueError, match="positions"):
        huge([10**12])


def test_stream_covers_each_epoch_once_and_resumes_anywhere():
    stream = ShuffledStream(range(10), seed=0, stream_id=0)
    epochs = [stream.take(10 * e, 10) for e in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs) and epochs[0] != epochs[1]
    straight = stream.take(0, 30)
    assert straight == sum(epochs, [])
    fresh = ShuffledStream(range(10), seed=0, stream_id=0)  # a resumed run: a new stream, asked mid-epoch
    assert fresh.take(13, 9) == straight[13:22] and [fresh[p] for p in (29, 3)] == [straight[29], straight[3]]


def write_jsonl(path, lines):
    path.write_text("".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines))
    return path


def test_index_reads_lines_by_offset_and_is_cached_beside_the_file(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"video": "v0.mp4", "text": "zero"}, "", {"image": "i1.png", "text": "one"},
                                              "{broken", {"latent": "l3.safetensors", "kind": "image", "text": 'say "image": no'},
                                              {"text": 'say "image": still a video', "video": "v4.mp4"}])
    index = AnnotationIndex(path)
    assert len(index) == 5  # the blank line is not an entry
    assert index[0].kind == "video" and index[0].path == str(tmp_path / "v0.mp4") and index[1].text == "one"
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        index[2]
    assert index[3].kind == "image" and index[3].latent == str(tmp_path / "l3.safetensors")
    assert [index.rows("image")[k] for k in range(len(index.rows("image")))] == [1, 3]
    assert [index.rows("video")[k] for k in range(len(index.rows("video")))] == [0, 2, 4]  # with the malformed line
    assert index[4].kind == "video"  # "image": inside an escaped string is not a key
    folder = index_folder(path)
    assert {p.name for p in folder.iterdir()} == {"lines.npy", "images.npy", "videos.npy", "meta.npy", "source.json"}
    assert isinstance(AnnotationIndex(path).indexes[0]["lines"], np.memmap)  # read back, not rebuilt
    copy = pickle.loads(pickle.dumps(index))  # what a DataLoader worker gets
    assert copy[1] == index[1]
    write_jsonl(path, [{"video": "w.mp4", "text": "changed"}])  # a changed file is indexed again
    assert len(AnnotationIndex(path)) == 1 and AnnotationIndex(path)[0].text == "changed"


def test_two_processes_building_one_index_at_once_both_succeed(tmp_path, monkeypatch, caplog):
    """Every rank of a launch indexes the same file: another process building it mid-build must not break this one."""
    import subprocess
    import sys
    from pathlib import Path

    import training.annotation_index as annotation_index

    path = write_jsonl(tmp_path / "a.jsonl", [{"video": f"v{i}.mp4", "text": str(i)} for i in range(50)]
                       + [{"image": "i.png", "text": "i"}])
    root = Path(__file__).resolve().parents[1]
    scan = annotation_index.scan_blocks

    def scan_with_a_rival(source):
        blocks = scan(source)
        yield next(blocks)
        rival = subprocess.run([sys.executable, "-c", f"from training.annotation_index import AnnotationIndex as A; "
                                f"print(len(A({str(source)!r})))"], cwd=root, capture_output=True, text=True)
        assert rival.returncode == 0 and rival.stdout.strip() == "51", rival.stderr[-2000:]
        yield from blocks

    monkeypatch.setattr(annotation_index, "CHUNK", 256)  # several blocks, so the rival runs mid-build
    monkeypatch.setattr(annotation_index, "scan_blocks", scan_with_a_rival)
    index = AnnotationIndex(path)
    assert len(index) == 51 and index[50].kind == "image" and index[7].text == "7"
    assert "cannot cache" not in caplog.text  # this process's build was not broken into the in-memory fallback
    assert sorted(p.name for p in index_folder(path).iterdir()) == ["images.npy", "lines.npy", "meta.npy",
                                                                   "source.json", "videos.npy"]  # no staging file left behind


def test_several_files_chain_and_the_last_line_needs_no_newline(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"image": f"i{i}.png", "text": str(i)} for i in range(3)])
    second = tmp_path / "b.jsonl"
    second.write_text(json.dumps({"video": "v.mp4", "text": "last"}))
    index = AnnotationIndex([first, second])
    assert len(index) == 4 and index[3].text == "last" and index.rows("video")[0] == 3
    with pytest.raises(IndexError):
        index[4]


def test_planner_on_the_index_matches_the_planner_on_a_list(tmp_path):
    from training.data import read_annotations

    lines = [{"video": f"v{i}.mp4", "text": "v", "height": 64, "width": 64} for i in range(6)]
    lines += [{"image": f"i{i}.png", "text": "i"} for i in range(3)]
    path = write_jsonl(tmp_path / "a.jsonl", lines)
    data = {"image_ratio": 0.25, "fps": 8, "buckets": [[64, 64]], "clip_schedule": [{"seconds": 2}]}
    listed = BatchPlanner(read_annotations(path)[0], data, OBJECTIVE, 0, 8, 2, 8)
    streamed = BatchPlanner(AnnotationIndex(path), data, OBJECTIVE, 0, 8, 2, 8)
    for step in (0, 1, 5):
        assert listed.bins(step) == streamed.bins(step)


def test_extraction_writes_resumable_shards_with_recorded_clip_starts(tmp_path):
    """Two processes share the shards; a rerun redoes only a missing shard; every clip start is recorded."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.training_helpers import tiny_world
    from training.annotation_index import AnnotationIndex
    from training.data import LATENT_KEY
    from training.shards import load_tensors

    checkpoint, annotations = tiny_world(tmp_path / "world", videos=3, images=1)
    out = tmp_path / "latents"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "training.extract_latents", "--model", str(checkpoint), "--annotations", str(annotations),
               "--output-dir", str(out), "--fps", "8", "--seconds", "1", "--buckets", "64x64", "--clips-per-video", "2",
               "--shard-size", "3"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # a rank's own message
    assert result.returncode == 0, "\n".join(errors) + "\n" + result.stderr[-3000:]
    assert "in this process" in result.stdout and result.stdout.count("wrote") == 2  # both ranks worked
    # ... on their own shards (ranks 0: shards 1 and 3, 1: shard 2), not each on all of them
    assert sorted(line.split("INFO training.shards: ")[1] for line in result.stderr.splitlines()
                  if "INFO training.shards: shard" in line) == [
        "shard 1 of 3 written (3 samples)", "shard 2 of 3 written (3 samples)", "shard 3 of 3 written (1 samples)"]
    shards = sorted(p.name for p in (out / "shards").glob("*.arrow"))
    assert shards == ["latents-00000.arrow", "latents-00001.arrow", "latents-00002.arrow"]  # 4 lines x 2 clips / 3
    index = AnnotationIndex(out / "annotations.jsonl")
    assert len(index) == 7  # the image has one clip
    starts = [index[i].clip_start for i in range(7) if index[i].kind == "video"]
    assert len(starts) == 6 and len(set(starts)) == 6 and all(0 <= s < 1 for s in starts)
    assert load_tensors(index[0].latent)[LATENT_KEY].shape == (4, 2, 8, 8)  # [C, t, h, w]: 9 frames -> 2
    assert load_tensors(index[6].latent)[LATENT_KEY].shape == (4, 1, 8, 8)  # the image
    finished = (out / "shards" / "latents-00000.arrow").stat().st_mtime_ns
    (out / "shards" / "latents-00002.jsonl").unlink()
    from training import extract_latents

    assert extract_latents.main(command[command.index("--model"):]) == 0
    assert (out / "shards" / "latents-00000.arrow").stat().st_mtime_ns == finished
    assert (out / "shards" / "latents-00002.jsonl").is_file() and len(AnnotationIndex(out / "annotations.jsonl")) == 7
    assert extract_latents.main([*command[command.index("--model"):], "--seconds", "12"]) == 2


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_the_streamed_index_files_equal_the_in_memory_index_across_block_sizes(tmp_path, monkeypatch, block):
    """Building streams each block into the .npy files (memory: one block); a read-only folder keeps the index in
    memory instead. Both agree, whatever the block size (lines longer than a block included)."""
    from training import annotation_index

    monkeypatch.setattr(annotation_index, "CHUNK", block)
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join([json.dumps({"video": "v.mp4", "text": "x"}), "", json.dumps({"image": "i.png"}),
                               json.dumps({"text": 'say "image": no', "video": "v"}), "",
                               json.dumps({"kind": "image", "latent": "l"})]))  # no newline at the end
    folder = tmp_path / "index"
    folder.mkdir()
    annotation_index.write_index(path, folder)
    in_memory = annotation_index.index_arrays(path)
    for name in annotation_index.INDEX_FILES:
        assert np.array_equal(np.load(folder / f"{name}.npy"), in_memory[name])
    assert in_memory["images"].tolist() == [1, 3] and in_memory["videos"].tolist() == [0, 2]
