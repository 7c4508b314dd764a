"""The MiniLM encoder: head+tail truncation, length-sorted batching, and the ONNX runtimes against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluators.encoder import EmbeddingCache, EncoderError, EncoderSettings, LruEmbedder, TextEncoder, text_key

SMALL = EncoderSettings(max_tokens=32, num_layers=2)
TEXTS = ["Short answer.", "A somewhat longer answer that explains the idea in a full sentence or two.",
         " ".join(f"word{i}" for i in range(200)) + " THE END", "", "Paris is the capital of France."]


@pytest.fixture(scope="module")
def torch_encoder():
    return TextEncoder(SMALL, batch_size=2)


def test_long_texts_keep_their_head_and_tail(torch_encoder):
    ids = torch_encoder.token_ids(TEXTS)
    assert max(len(x) for x in ids) == SMALL.max_tokens
    long_ids = ids[2]
    tok = torch_encoder.tokenizer
    assert tok.decode(long_ids[1:3]).startswith("word")
    assert tok.decode(long_ids[-4:-1]).replace(" ", "").endswith("theend")
    assert long_ids[0] == tok.cls_token_id and long_ids[-1] == tok.sep_token_id


def test_batching_does_not_change_embeddings(torch_encoder):
    together = torch_encoder.encode(TEXTS)
    alone = np.stack([torch_encoder.encode([t])[0] for t in TEXTS])
    assert together.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_a_lone_surrogate_is_embedded_as_a_replacement_character_and_the_batch_survives(torch_encoder):
    """json.loads makes a lone surrogate of a cut emoji pair ("\\ud83d"); the tokenizer cannot take one."""
    lone = json.loads('"broken emoji \\ud83d here"')
    together = torch_encoder.encode([lone, "\ud83d\ude00 split pair", *TEXTS])
    np.testing.assert_allclose(together[0], torch_encoder.encode(["broken emoji \ufffd here"])[0], atol=1e-5)
    np.testing.assert_allclose(together[1], torch_encoder.encode(["\U0001f600 split pair"])[0], atol=1e-5)
    np.testing.assert_allclose(together[2:], torch_encoder.encode(TEXTS), atol=1e-5)
    assert text_key(lone) != text_key("broken emoji \ufffd here")  # caches still tell the texts apart

def test_onnx_matches_torch_and_int8_stays_close(torch_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("SHADOWJUDGE_CACHE_DIR", str(tmp_path))
    reference = torch_encoder.encode(TEXTS)
    fp32 = TextEncoder(SMALL, backend="onnx").encode(TEXTS)
    int8 = TextEncoder(SMALL, backend="onnx-int8").encode(TEXTS)
    np.testing.assert_allclose(fp32, reference, atol=1e-4)
    assert (int8 * reference).sum(1).min() > 0.95
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2  # exported once, cached by fingerprint


def test_caches_encode_each_text_once(torch_encoder, tmp_path):
    calls = []

    class Counting:
        def encode(self, texts, progress=None):
            calls.append(len(texts))
            return torch_encoder.encode(texts)

    lru = LruEmbedder(Counting(), capacity=3)
    first = lru.embed(TEXTS[:2] + TEXTS[:2])
    again = lru.embed(TEXTS[:2])
    assert calls == [2] and np.array_equal(first[:2], again)
    disk = EmbeddingCache(tmp_path, SMALL)
    disk._encoder = Counting()
    disk.embed(TEXTS)
    disk.save()
    reloaded = EmbeddingCache(tmp_path, SMALL)
    assert len(reloaded) == len(set(TEXTS)) and reloaded.missing(TEXTS) == 0
    np.testing.assert_allclose(reloaded.embed(TEXTS), torch_encoder.encode(TEXTS), atol=2e-3)  # stored as fp16


def test_layer_mean_pooling_averages_every_layer_in_torch_and_onnx(torch_encoder, tmp_path, monkeypatch):
    """Pooling 'layer-mean' is the normalised mean of each layer's pooled output: computed here by hand from the
    model's hidden states, matched by the encoder and its ONNX export; the default pooling keeps its cache key."""
    import torch

    monkeypatch.setenv("SHADOWJUDGE_CACHE_DIR", str(tmp_path))
    mean = EncoderSettings(max_tokens=32, num_layers=2, pooling="layer-mean")
    encoder = TextEncoder(mean, batch_size=2)
    ids = encoder.token_ids(TEXTS[:1])
    with torch.inference_mode():
        states = encoder._model.model(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states
    layers = [torch.nn.functional.normalize(h.mean(1), dim=-1) for h in states[1:]]
    by_hand = torch.nn.functional.normalize(torch.stack(layers).mean(0), dim=-1).numpy()
    assert len(layers) == 2
    np.testing.assert_allclose(encoder.encode(TEXTS[:1]), by_hand, atol=1e-5)
    both = encoder.encode(TEXTS)
    np.testing.assert_allclose(TextEncoder(mean, backend="onnx").encode(TEXTS), both, atol=1e-4)
    assert (both * torch_encoder.encode(TEXTS)).sum(1).max() < 0.999  # not the last layer's embedding
    assert mean.fingerprint() != SMALL.fingerprint()
    assert EncoderSettings().fingerprint() == "baaf1f5bc9"  # the key of every cache made before the option


def test_bad_settings_are_clear_errors():
    with pytest.raises(EncoderError, match="num_layers must be in 1..6"):
        TextEncoder(EncoderSettings(num_layers=9))
    with pytest.raises(EncoderError, match="pooling must be one of"):
        TextEncoder(EncoderSettings(pooling="max"))
    with pytest.raises(EncoderError, match="backend must be one of"):
        TextEncoder(SMALL, backend="tpu")


class ConstantEncoder:
    """Stands in for the encoder where only the cache's bookkeeping is tested: no model loaded."""

    def encode(self, texts, progress=None):
        return np.full((len(texts), 384), 384 ** -0.5, dtype=np.float32)


def _filled_cache(directory, texts) -> EmbeddingCache:
    cache = EmbeddingCache(directory, SMALL)
    cache._encoder = ConstantEncoder()
    cache.embed(texts)
    return cache


@pytest.mark.parametrize("corrupt", [lambda path: path.write_bytes(b"not an npz"),
                                     lambda path: path.write_bytes(path.read_bytes()[:200])])  # cut short
def test_an_unreadable_embedding_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, corrupt):
    _filled_cache(tmp_path, TEXTS).save()
    path = EmbeddingCache(tmp_path, SMALL).path
    corrupt(path)
    with pytest.warns(RuntimeWarning, match=f"{path.name}: unreadable embedding cache"):
        rebuilt = _filled_cache(tmp_path, TEXTS[:2])
    assert len(rebuilt) == 2
    rebuilt.save()
    assert EmbeddingCache(tmp_path, SMALL).missing(TEXTS[:2]) == 0


def test_two_processes_saving_one_cache_directory_write_their_own_temporary_files(tmp_path, monkeypatch):
    """Training beside a bench on one cache directory: the other process saves while this one is writing."""
    first, second = _filled_cache(tmp_path, TEXTS[:2]), _filled_cache(tmp_path, TEXTS[2:])
    savez = np.savez

    def savez_while_the_other_saves(file, **arrays):
        savez(file, **arrays)
        monkeypatch.setattr(np, "savez", savez)
        second.save()

    monkeypatch.setattr(np, "savez", savez_while_the_other_saves)
    first.save()
    assert EmbeddingCache(tmp_path, SMALL).missing(TEXTS[:2]) == 0  # the last save wins, whole
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]
