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
