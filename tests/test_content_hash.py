"""A model's content identity: large files hashed in parallel chunks, same digest every time."""

from __future__ import annotations

import hashlib

from quantgate import models


def test_tree_hash_is_the_sha256_of_its_chunk_digests_and_sees_one_byte(tmp_path):
    data = bytes(range(256)) * 1000 + b"tail"
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    chunk = 4096
    expected = hashlib.sha256(b"".join(hashlib.sha256(data[i : i + chunk]).digest() for i in range(0, len(data), chunk)))
    assert models.file_tree_sha256(f, chunk=chunk) == "tree0m:" + expected.hexdigest()
    f.write_bytes(data[:-1] + b"T")
    assert models.file_tree_sha256(f, chunk=chunk) != "tree0m:" + expected.hexdigest()


def test_dir_hash_uses_the_tree_digest_for_large_files_only(tmp_path, monkeypatch):
    (tmp_path / "big.safetensors").write_bytes(b"x" * 10_000)
    (tmp_path / "config.json").write_bytes(b"{}")
    plain = models.dir_content_hash(tmp_path)
    monkeypatch.setattr(models, "TREE_HASH_MIN", 5_000)
    monkeypatch.setattr(models, "TREE_CHUNK", 1024)
    tree = models.dir_content_hash(tmp_path)
    assert tree != plain
    assert tree == models.dir_content_hash(tmp_path)
    h = hashlib.sha256()
    h.update(b"big.safetensors")
    h.update(models.file_tree_sha256(tmp_path / "big.safetensors", chunk=1024).encode())
    h.update(b"config.json")
    h.update(models.file_sha256(tmp_path / "config.json").encode())
    assert tree == h.hexdigest()
