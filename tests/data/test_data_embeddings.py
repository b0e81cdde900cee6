"""Embedding folders (clip-retrieval / LAION layout): the reader, the split, rank/worker slices, resume."""
from __future__ import annotations

import numpy as np
import pytest

from tests.data.embedding_testutils import row_value, write_embedding_folder
from unclip_pl.data.embedding_folder import EmbeddingFolder, EmbeddingFolderError


# ------------------------------------------------------------------------------------------------ the reader
def test_reader_gathers_rows_of_every_part_in_the_order_asked(tmp_path):
    write_embedding_folder(tmp_path, [5, 7, 3], dim=8)
    folder = EmbeddingFolder(tmp_path)
    assert (len(folder.files), folder.num_rows, folder.dim) == (3, 15, 8)
    files, rows = np.array([1, 0, 1, 2]), np.array([3, 2, 0, 1])
    batch = folder.gather(files, rows)
    expect = np.array([row_value(1, 3), row_value(0, 2), row_value(1, 0), row_value(2, 1)])
    assert batch["img_emb"].dtype == np.float32 and batch["img_emb"].shape == (4, 8)
    np.testing.assert_array_equal(batch["img_emb"], np.repeat(expect[:, None], 8, axis=1))
    np.testing.assert_array_equal(batch["txt_emb"], -batch["img_emb"])
    assert batch["txt"] == ["caption 1 3", "caption 0 2", "caption 1 0", "caption 2 1"]
    assert batch["key"] == ["00100003", "00000002", "00100000", "00200001"]


def test_file_numbers_match_as_integers_and_metadata_may_live_elsewhere(tmp_path):
    write_embedding_folder(tmp_path / "emb", [4], numbers=[7], digits=1, metadata_folder=tmp_path / "meta")
    folder = EmbeddingFolder(tmp_path / "emb", tmp_path / "meta")
    assert folder.files[0].number == 7 and folder.files[0].metadata.parent == tmp_path / "meta"
    assert folder.gather([0], [3], ["txt"])["txt"] == ["caption 7 3"]


def test_lookup_by_key_joins_and_names_missing_keys(tmp_path):
    write_embedding_folder(tmp_path, [3, 3])
    folder = EmbeddingFolder(tmp_path)
    out = folder.lookup(["00100002", "00000001"])
    np.testing.assert_array_equal(out["img_emb"][:, 0], [row_value(1, 2), row_value(0, 1)])
    assert folder.key_index()["00100000"] == (1, 0)
    with pytest.raises(KeyError, match=r"1 of 2 keys are not in .*'nope'"):
        folder.lookup(["00000000", "nope"])


def test_reader_pickles_without_its_memory_maps(tmp_path):
    import pickle

    write_embedding_folder(tmp_path, [3])
    folder = EmbeddingFolder(tmp_path)
    folder.gather([0], [1])
    copy = pickle.loads(pickle.dumps(folder))
    assert copy._maps == {} and copy.gather([0], [2], ["txt"])["txt"] == ["caption 0 2"]


# ------------------------------------------------------------------------------------------------ bad folders
def _truncate_parquet_rows(path, keep):
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(path).slice(0, keep), path)


def test_row_count_mismatch_fails_at_once_naming_file_and_both_counts(tmp_path):
    write_embedding_folder(tmp_path, [5, 6])
    _truncate_parquet_rows(tmp_path / "metadata" / "metadata_0001.parquet", 4)
    with pytest.raises(EmbeddingFolderError) as e:
        EmbeddingFolder(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "metadata_0001.parquet has 4 rows" in msg and "img_emb_0001.npy has 6" in msg


def test_text_emb_row_mismatch_names_the_text_file(tmp_path):
    write_embedding_folder(tmp_path, [5])
    np.save(tmp_path / "text_emb" / "text_emb_0000.npy", np.zeros((3, 8), np.float16))
    with pytest.raises(EmbeddingFolderError, match=r"text_emb_0000\.npy has 3 rows but .*img_emb_0000\.npy has 5"):
        EmbeddingFolder(tmp_path)


@pytest.mark.parametrize("damage, message", [
    ("missing_meta", r"has no metadata file numbered 1"),
    ("no_caption", r"has no 'caption' column"),
    ("width", r"holds 4-d embeddings but the folder's first file holds 8-d"),
    ("truncated", r"img_emb_0001\.npy is not a readable \.npy file"),
    ("empty", r"holds no img_emb_\{N\}\.npy files"),
])
def test_malformed_folders_fail_in_one_line(tmp_path, damage, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_embedding_folder(tmp_path, [3, 3])
    if damage == "missing_meta":
        (tmp_path / "metadata" / "metadata_0001.parquet").unlink()
    elif damage == "no_caption":
        pq.write_table(pa.table({"text": ["a", "b", "c"]}), tmp_path / "metadata" / "metadata_0001.parquet")
    elif damage == "width":
        np.save(tmp_path / "img_emb" / "img_emb_0001.npy", np.zeros((3, 4), np.float16))
    elif damage == "truncated":
        path = tmp_path / "img_emb" / "img_emb_0001.npy"
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "empty":
        for p in (tmp_path / "img_emb").iterdir():
            p.unlink()
    with pytest.raises(EmbeddingFolderError, match=message) as e:
        EmbeddingFolder(tmp_path)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ split
def test_files_split_holds_out_the_last_files_and_is_disjoint(tmp_path):
    from unclip_pl.data.embedding_folder import split_folder

    write_embedding_folder(tmp_path, [4, 5, 6])
    folder = EmbeddingFolder(tmp_path)
    train, val, how = split_folder(folder, "files", val_files=1)
    assert [p.file for p in train] == [0, 1] and [p.file for p in val] == [2]
    assert "train 9 rows, val 6 rows" in how and "last 1 file(s) (2)" in how
    with pytest.raises(ValueError, match="so that one is left to train on"):
        split_folder(folder, "files", val_files=3)


def _rows_of(parts, folder):
    out = set()
    for p in parts:
        rows = range(folder.files[p.file].rows) if p.rows is None else p.rows.tolist()
        out |= {(p.file, r) for r in rows}
    return out


def test_hash_split_is_deterministic_disjoint_and_follows_the_key(tmp_path):
    from unclip_pl.data.embedding_folder import key_hash_fraction, split_folder

    write_embedding_folder(tmp_path, [60, 50])
    folder = EmbeddingFolder(tmp_path)
    train, val, how = split_folder(folder, "hash", val_fraction=0.2)
    again = split_folder(EmbeddingFolder(tmp_path), "hash", val_fraction=0.2)
    assert [p.rows.tolist() for p in val] == [p.rows.tolist() for p in again[1]]
    t, v = _rows_of(train, folder), _rows_of(val, folder)
    assert not t & v and len(t | v) == 110 and 5 < len(v) < 40
    assert all((key_hash_fraction(folder.keys(f, [r])[0]) < 0.2) == ((f, r) in v) for f, r in t | v)
    assert f"val {len(v)} rows" in how


# ------------------------------------------------------------------------------------------------ order, ranks, workers
def test_pass_order_is_a_seeded_permutation_new_each_pass(tmp_path):
    from unclip_pl.data.embedding_folder import PassOrder, split_folder

    write_embedding_folder(tmp_path, [7, 9, 4])
    folder = EmbeddingFolder(tmp_path)
    parts = split_folder(folder, "files", val_files=0)[0]

    def seq(seed, p, window=5):
        f, r = PassOrder(parts, seed, p, window).take(0, 20)
        return list(zip(f.tolist(), r.tolist()))

    assert sorted(seq(0, 0)) == sorted(_rows_of(parts, folder)) and len(set(seq(0, 0))) == 20
    assert seq(0, 0) == seq(0, 0) and seq(0, 0) != seq(0, 1) and seq(0, 0) != seq(1, 0)
    order = PassOrder(parts, 3, 2, window=5)  # windows read piecewise give the same sequence as at once
    pieces = [order.take(a, a + 3) for a in range(0, 20, 3)]
    np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), PassOrder(parts, 3, 2, 5).take(0, 20)[1])


def _tokenizer():
    from tests.data.data_testutils import FakeCLIP

    return FakeCLIP().tokenize


def _run_rank(folder, parts, rank, world, workers=0, batch=4, position=(0, 0), seed=0):
    from torch.utils.data import DataLoader

    from unclip_pl.data.embedding_folder import POSITION_KEY, EmbeddingBatches

    ds = EmbeddingBatches(folder, parts, batch, train=True, tokenizer=_tokenizer(), seed=seed, window=8,
                          rank=rank, world_size=world)
    ds.position = position
    out = list(DataLoader(ds, batch_size=None, num_workers=workers))
    for b in out:
        assert b["img_emb"].dtype.is_floating_point and b["img_emb"].dtype.itemsize == 4
        assert b["tokens"].shape[0] == len(b["key"]) == batch
    return ds, [b["key"] for b in out], [b[POSITION_KEY] for b in out]


def test_ranks_read_disjoint_rows_and_take_the_same_number_of_steps(tmp_path):
    write_embedding_folder(tmp_path, [13, 11, 15])
    folder = EmbeddingFolder(tmp_path)
    from unclip_pl.data.embedding_folder import split_folder

    parts = split_folder(folder, "files", val_files=0)[0]
    ranks = [_run_rank(folder, parts, r, 3)[1] for r in range(3)]
    steps = {len(keys) for keys in ranks}
    assert steps == {39 // 12}  # 39 rows, global batch 3 x 4: every rank takes 3 steps
    flat = [k for keys in ranks for batch in keys for k in batch]
    assert len(flat) == len(set(flat)) == 36
    # step k of rank r holds the r-th four of global step k's positions: ranks in lockstep over one sequence
    ds, one_rank, _ = _run_rank(folder, parts, 0, 1, batch=12)
    assert [sum((ranks[r][k] for r in range(3)), []) for k in range(3)] == one_rank


def test_workers_make_disjoint_steps_handed_out_in_step_order(tmp_path):
    from unclip_pl.data.embedding_folder import split_folder

    write_embedding_folder(tmp_path, [21, 19])
    folder = EmbeddingFolder(tmp_path)
    parts = split_folder(folder, "files", val_files=0)[0]
    _, alone, pos0 = _run_rank(folder, parts, 1, 2)
    _, two_workers, pos2 = _run_rank(folder, parts, 1, 2, workers=2)
    assert two_workers == alone and pos2 == pos0 and len(alone) == 5  # 40 // 8
    assert [p[1] for p in pos0] == [8, 16, 24, 32, 40]


def test_the_position_resumes_the_same_sequence(tmp_path):
    from unclip_pl.data.embedding_folder import split_folder

    write_embedding_folder(tmp_path, [17, 23])
    folder = EmbeddingFolder(tmp_path)
    parts = split_folder(folder, "files", val_files=0)[0]
    ds, full, positions = _run_rank(folder, parts, 0, 2, seed=5)
    n = 2
    _, rest, _ = _run_rank(folder, parts, 0, 2, seed=5, position=positions[n - 1])
    assert rest == full[n:]
    assert ds.next_position(*positions[-1]) == (1, 0)  # after the last full step: the next pass
    _, next_pass, _ = _run_rank(folder, parts, 0, 2, seed=5, position=(1, 0))
    assert next_pass != full and sorted(sum(next_pass, [])) != sorted(sum(full, []))  # a new shuffle


# ------------------------------------------------------------------------------------------------ the data module
class _Trainer:
    """What the data module reads of a Trainer: rank, world size, whether it is training."""

    def __init__(self, rank=0, world=1):
        self.global_rank, self.world_size, self.training = rank, world, True


def _module(tmp_path, **kw):
    from unclip_pl.data.embedding_folder import EmbeddingDataModule

    args = dict(batch_size=4, num_workers=0, tokenizer=_tokenizer(), shuffle_window=8, seed=3, pin_memory=False)
    args.update(kw)
    return EmbeddingDataModule(str(tmp_path), **args)


def _consume(dm, steps=None):
    keys = []
    for i, batch in enumerate(dm.train_dataloader()):
        if steps is not None and i >= steps:
            break
        batch = dm.on_before_batch_transfer(batch, 0)
        assert set(batch) == {"key", "txt", "tokens", "img_emb", "txt_emb"}
        keys.append(batch["key"])
    return keys


def test_data_module_state_continues_the_sequence_across_passes(tmp_path, caplog):
    import logging

    write_embedding_folder(tmp_path, [10, 9, 8])  # train: files 0, 1 (19 rows): 4 steps of 4 per pass
    dm = _module(tmp_path)
    dm.trainer = _Trainer()
    with caplog.at_level(logging.INFO, logger="unclip_pl.data.embedding_folder"):
        dm.setup("fit")
    assert "split=files: val = the last 1 file(s) (2); train 19 rows, val 8 rows" in caplog.text
    assert "4 steps per pass (3 rows left out per pass)" in caplog.text
    uninterrupted = _consume(dm) + _consume(dm)  # two passes (epochs)
    assert dm.state_dict()["pass"] == 2

    first = _module(tmp_path)
    first.trainer = _Trainer()
    first.setup("fit")
    head = _consume(first) + _consume(first, steps=2)  # one pass and two steps, then "preempted"
    state = first.state_dict()
    assert {k: state[k] for k in ("pass", "samples", "samples_per_rank")} == {"pass": 1, "samples": 8,
                                                                             "samples_per_rank": 8}
    assert state["settings"]["seed"] == 3 and state["settings"]["train_rows"] == 19
    resumed = _module(tmp_path)
    resumed.trainer = _Trainer()
    resumed.setup("fit")
    resumed.load_state_dict(state)
    assert head + _consume(resumed) == uninterrupted
    val = [b["key"] for b in resumed.val_dataloader()]
    assert sum(val, []) == [f"002{r:05d}" for r in range(8)]  # val: the held-out file, in order

    other = _module(tmp_path, seed=99)  # another order: the saved pass restarts from its start, said in one line
    other.trainer = _Trainer()
    other.setup("fit")
    with caplog.at_level(logging.WARNING, logger="unclip_pl.data.embedding_folder"):
        other.load_state_dict(state)
    assert "does not fit this run (seed: 3 -> 99): pass 1 restarts from its start" in caplog.text
    assert other.position == (1, 0)


def test_two_ranks_resume_on_one_rank_from_the_same_sample(tmp_path):
    """The position is a sample offset in one sequence: a run on 2 ranks resumed on 1 (twice the batch) continues
    with exactly the samples the 2 ranks had not read."""
    write_embedding_folder(tmp_path, [16, 16, 4])
    ranks = []
    for r in range(2):
        dm = _module(tmp_path, batch_size=4)
        dm.trainer = _Trainer(r, 2)
        dm.setup("fit")
        ranks.append(dm)
    seen = [sum(_consume(dm, steps=2), []) for dm in ranks]
    state = ranks[0].state_dict()
    assert (state["samples"], state["samples_per_rank"], state["world_size"]) == (16, 8, 2)
    single = _module(tmp_path, batch_size=8)
    single.trainer = _Trainer()
    single.setup("fit")
    single.load_state_dict(state)
    rest = sum(_consume(single), [])
    assert len(rest) == 16 and not set(rest) & set(seen[0] + seen[1])
    assert sorted(rest + seen[0] + seen[1]) == sorted(f"{n:03d}{r:05d}" for n in (0, 1) for r in range(16))


def test_without_a_trainer_the_loader_drops_the_position_tags(tmp_path):
    write_embedding_folder(tmp_path, [8, 4])
    dm = _module(tmp_path)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(set(b) == {"key", "txt", "tokens", "img_emb", "txt_emb"} for b in batches)


def test_data_module_errors_are_one_line(tmp_path):
    from unclip_pl.utils.config import ConfigError

    write_embedding_folder(tmp_path, [6, 6], dim=8)

    class Clip:
        embed_dim, model_name = 128, "unclip-tiny"

    with pytest.raises(ConfigError, match=r"holds 8-d CLIP embeddings but this run's CLIP \(unclip-tiny\) is "
                                          r"128-d: pass the CLIP .* clip=vit_l14"):
        _module(tmp_path, clip=Clip()).setup("fit")
    with pytest.raises(ConfigError, match=r"not \['image'\]: it trains the prior"):
        _module(tmp_path, needs=("image", "txt"))
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        _module(tmp_path, batch_size=7).setup("fit")
    with pytest.raises(ConfigError, match="is not a folder"):
        _module(tmp_path / "nope").setup("fit")


def test_pass_order_counts_the_files_a_window_spans(tmp_path):
    from unclip_pl.data.embedding_folder import Part, PassOrder

    parts = [Part(i, None, n) for i, n in enumerate([5, 5, 5, 5])]
    assert PassOrder(parts, window=20).files_per_window() == 4
    assert PassOrder(parts, window=5, shuffle=False).files_per_window() == 1
    assert PassOrder(parts, window=6, shuffle=False).files_per_window() == 2  # [0, 6) spans files 0 and 1
