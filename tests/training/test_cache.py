"""kinema.training.cache: fingerprints that change with one bit of a weight or a setting, and a cache that computes
only its misses, serves rows bit-equal to a direct compute, survives a restart from its folder, drops damaged
entries and refuses folders that are not its own."""

import json
import logging

import pytest
import torch
from loaders.test_stable_diffusion import TINY_CLIP
from tiny_models import perturb
from transformers import CLIPTextConfig, CLIPTextModel

from kinema.errors import KinemaError
from kinema.fileio import MANIFEST, output_kind
from kinema.training.cache import CACHE_KIND, EmbeddingCache, module_fingerprint, tensor_key

# ---------------------------------------------------------------- helpers


def reference_rows(keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What an encoder gives for `keys`, computed row by row from each key alone (seeded by the key): the direct
    compute that the cache must reproduce bit for bit."""
    latents, masks = [], []
    for key in keys:
        gen = torch.Generator().manual_seed(int(key[:8], 16))
        latents.append(torch.randn(2, 3, 5, generator=gen).to(dtype))
        masks.append(torch.rand(7, generator=gen) > 0.5)
    return {"latents": torch.stack(latents), "mask": torch.stack(masks)}


class Recorder:
    """A compute function that encodes `keys` with `reference_rows` and records the positions it was asked for."""

    def __init__(self, keys: list[str], dtype: torch.dtype = torch.float32):
        self.keys, self.dtype, self.calls = keys, dtype, []

    def __call__(self, missing: list[int]) -> dict[str, torch.Tensor]:
        self.calls.append(list(missing))
        return reference_rows([self.keys[i] for i in missing], self.dtype)


def never(missing: list[int]) -> dict[str, torch.Tensor]:
    raise AssertionError(f"compute called for {missing}, but every key should hit")


def assert_bit_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), expected[name].reshape(-1).view(torch.uint8)), name


KEYS = [tensor_key(f"clip-{i}.mp4", 0, i) for i in range(5)]


def entry_files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def one_ulp_up(tensor: torch.Tensor) -> None:
    """Raise the first element by one unit in the last place, in place, through its integer bits."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[tensor.dtype]
    with torch.no_grad():
        tensor.view(-1).view(bits)[0] += 1


# ---------------------------------------------------------------- fingerprints and keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fingerprint_changes_with_one_ulp_of_one_weight(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(dtype)
    before = module_fingerprint(model)
    assert len(before) == 64 and int(before, 16) >= 0
    weight = model[1].weight
    old = weight.detach().clone()
    one_ulp_up(weight)
    changed = (weight.detach() != old).nonzero().tolist()
    assert changed == [[0]] and abs(weight[0].item() - old[0].item()) <= 2 * torch.finfo(dtype).eps
    assert module_fingerprint(model) != before
    with torch.no_grad():
        weight.copy_(old)
    assert module_fingerprint(model) == before


def test_fingerprint_covers_dtype_buffers_class_and_settings():
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm1d(3)
    base = module_fingerprint(norm, settings={"max_length": 77, "dtype": torch.float32})
    # settings: order-free, but every value counts
    assert module_fingerprint(norm, settings={"dtype": torch.float32, "max_length": 77}) == base
    assert module_fingerprint(norm, settings={"max_length": 76, "dtype": torch.float32}) != base
    assert module_fingerprint(norm, settings={"max_length": 77, "dtype": torch.bfloat16}) != base
    assert module_fingerprint(norm) != base
    # a buffer (running statistics) is part of the weights
    norm.running_mean += 1
    assert module_fingerprint(norm, settings={"max_length": 77, "dtype": torch.float32}) != base
    # the same bytes in another dtype, and the same weights in a subclass, differ
    half = torch.nn.Linear(2, 2).to(torch.float16)
    as_bf16 = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with torch.no_grad():
        as_bf16.weight.view(torch.int16).copy_(half.weight.view(torch.int16))
        as_bf16.bias.view(torch.int16).copy_(half.bias.view(torch.int16))
    assert module_fingerprint(half) != module_fingerprint(as_bf16)

    class MyLinear(torch.nn.Linear):
        pass

    mine = MyLinear(2, 2).to(torch.float16)
    mine.load_state_dict(half.state_dict())
    assert module_fingerprint(mine) != module_fingerprint(half)
    # several modules: the order counts
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert module_fingerprint(a, b) != module_fingerprint(b, a)


def test_fingerprint_is_stable_across_a_reload_of_the_same_weights(tmp_path):
    encoder = perturb(CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), 3).eval()
    settings = {"max_length": 77, "tokenizer": "tiny"}
    encoder.save_pretrained(tmp_path / "text_encoder")
    reloaded = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    assert module_fingerprint(reloaded, settings=settings) == module_fingerprint(encoder, settings=settings)
    other = perturb(CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), 4).eval()
    assert module_fingerprint(other, settings=settings) != module_fingerprint(encoder, settings=settings)


def test_fingerprint_refuses_what_it_cannot_hash():
    with pytest.raises(KinemaError, match="at least one module"):
        module_fingerprint()
    with pytest.raises(KinemaError, match="not a torch module"):
        module_fingerprint({"weight": torch.ones(1)})  # type: ignore[arg-type]
    with pytest.raises(KinemaError, match="no stable text form"):
        module_fingerprint(torch.nn.Linear(1, 1), settings={"tokenizer": object()})
    with torch.device("meta"):
        unloaded = torch.nn.Linear(1, 1)
    with pytest.raises(KinemaError, match="meta device"):
        module_fingerprint(unloaded)


def test_tensor_key_names_dtype_shape_bytes_and_kinds():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    key = tensor_key(x)
    assert len(key) == 64
    assert tensor_key(x.clone()) == key
    assert tensor_key(x.t().contiguous().t()) == key  # a view with other strides: the same values, the same key
    assert tensor_key(x.reshape(4, 3)) != key
    assert tensor_key(x.view(torch.int32)) != key  # the same bytes, another dtype
    y = x.clone()
    one_ulp_up(y)
    assert tensor_key(y) != key
    bf16 = x.to(torch.bfloat16)
    assert tensor_key(bf16) == tensor_key(bf16.clone()) != tensor_key(bf16.view(torch.float16))
    # the kinds and the borders between parts count
    distinct = [("ab", "c"), ("a", "bc"), ("1",), (1,), (1.0,), (True,), (1, 2), (12,), (0.0,), (-0.0,)]
    assert len({tensor_key(*parts) for parts in distinct}) == len(distinct)
    assert tensor_key("a", 1, 0.5, x) == tensor_key("a", 1, 0.5, x.clone())
    with pytest.raises(KinemaError, match="tensors, strings, ints"):
        tensor_key(None)  # type: ignore[arg-type]
    with pytest.raises(KinemaError, match="at least one part"):
        tensor_key()


# ---------------------------------------------------------------- the cache in memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_get_many_computes_only_the_misses_and_returns_the_direct_compute(dtype):
    cache = EmbeddingCache("ns", memory_items=16)
    first = Recorder(KEYS, dtype)
    assert_bit_equal(cache.get_many([KEYS[1], KEYS[3]], lambda m: first([[1, 3][i] for i in m])),
                     reference_rows([KEYS[1], KEYS[3]], dtype))
    assert first.calls == [[1, 3]] and (cache.hits, cache.misses) == (0, 2)

    batch = Recorder(KEYS, dtype)
    got = cache.get_many(KEYS, batch)
    assert batch.calls == [[0, 2, 4]]  # once, for the misses only
    assert_bit_equal(got, reference_rows(KEYS, dtype))
    assert (cache.hits, cache.misses) == (2, 5)

    assert_bit_equal(cache.get_many(KEYS[::-1], never), reference_rows(KEYS[::-1], dtype))
    assert (cache.hits, cache.misses) == (7, 5)


def test_repeated_keys_are_computed_once_and_memory_keeps_the_most_recent():
    cache = EmbeddingCache("ns", memory_items=2)
    keys = [KEYS[0], KEYS[1], KEYS[0]]
    compute = Recorder(keys)
    assert_bit_equal(cache.get_many(keys, compute), reference_rows(keys, torch.float32))
    assert compute.calls == [[0, 1]] and (cache.hits, cache.misses) == (1, 2)
    cache.get_many([KEYS[0]], never)  # KEYS[0] is now the most recent, so KEYS[2] pushes out KEYS[1]
    cache.get_many([KEYS[2]], Recorder([KEYS[2]]))
    again = Recorder([KEYS[1]])
    cache.get_many([KEYS[1]], again)
    assert again.calls == [[0]]
    cache.get_many([KEYS[2]], never)
    assert cache.get_many([], never) == {}


def test_returned_batches_are_copies():
    cache = EmbeddingCache("ns")
    got = cache.get_many(KEYS[:2], Recorder(KEYS[:2]))
    got["latents"].zero_()
    assert_bit_equal(cache.get_many(KEYS[:2], never), reference_rows(KEYS[:2], torch.float32))


def test_bad_keys_and_bad_compute_output_are_refused_before_storing():
    cache = EmbeddingCache("ns")
    with pytest.raises(KinemaError, match="cache key"):
        cache.get_many(["../escape"], never)
    with pytest.raises(KinemaError, match="2 rows for 1 missing"):
        cache.get_many([KEYS[0]], lambda m: reference_rows(KEYS[:2], torch.float32))
    with pytest.raises(KinemaError, match="non-empty dict"):
        cache.get_many([KEYS[0]], lambda m: torch.zeros(1))  # type: ignore[arg-type, return-value]
    cache.get_many([KEYS[0]], Recorder(KEYS))
    with pytest.raises(KinemaError, match="put what changed into the namespace"):
        cache.get_many(KEYS[:2], lambda m: {"latents": torch.zeros(len(m), 9)})
    assert (cache.hits, cache.misses) == (0, 1)
    # rows cached from inputs of different sizes (a namespace that does not say the size) cannot form one batch
    cache.get_many([KEYS[1]], lambda m: {"latents": torch.zeros(1, 2, 3, 6), "mask": torch.zeros(1, 7, dtype=bool)})
    with pytest.raises(KinemaError, match="differ in names, dtypes or shapes"):
        cache.get_many(KEYS[:2], never)
    with pytest.raises(KinemaError, match="namespace"):
        EmbeddingCache("../x")
    with pytest.raises(KinemaError, match="memory_items"):
        EmbeddingCache("ns", memory_items=-1)


# ---------------------------------------------------------------- the cache on disk


def test_a_folder_cache_survives_a_restart_and_namespaces_are_apart(tmp_path):
    folder = tmp_path / "cache"
    namespace = "a" * 64
    cache = EmbeddingCache(namespace, folder)
    expected = reference_rows(KEYS, torch.bfloat16)
    assert_bit_equal(cache.get_many(KEYS, Recorder(KEYS, torch.bfloat16)), expected)

    assert output_kind(folder) == CACHE_KIND
    files = entry_files(folder)
    assert files == sorted([MANIFEST] + [f"{'a' * 16}/{k[:2]}/{k}.safetensors" for k in KEYS])  # no temporaries

    restarted = EmbeddingCache(namespace, folder, memory_items=0)
    assert_bit_equal(restarted.get_many(KEYS, never), expected)
    assert (restarted.hits, restarted.misses) == (5, 0)

    other = EmbeddingCache("b" * 64, folder)
    compute = Recorder(KEYS, torch.bfloat16)
    other.get_many(KEYS, compute)
    assert compute.calls == [list(range(5))]
    # a namespace that shares the sub-folder (the first 16 characters) never sees the other's entries
    sharing = EmbeddingCache("a" * 16 + "-other", folder, memory_items=0)
    compute = Recorder(KEYS, torch.float32)
    assert_bit_equal(sharing.get_many(KEYS[:1], compute), reference_rows(KEYS[:1], torch.float32))
    assert compute.calls == [[0]]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_entry_is_removed_recomputed_and_warned_about_once(tmp_path, caplog, damage):
    folder = tmp_path / "cache"
    EmbeddingCache("ns", folder).get_many(KEYS[:3], Recorder(KEYS[:3]))
    path = EmbeddingCache("ns", folder).entry_path(KEYS[1])
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:  # one bit of the tensor data, after the header: a file that still parses
        data[-5] ^= 0x10
    path.write_bytes(bytes(data))

    cache = EmbeddingCache("ns", folder, memory_items=0)
    compute = Recorder(KEYS[:3])
    with caplog.at_level(logging.WARNING, logger="kinema"):
        got = cache.get_many(KEYS[:3], compute)
    assert compute.calls == [[1]]
    assert_bit_equal(got, reference_rows(KEYS[:3], torch.float32))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "damaged" in warnings[0].getMessage() and str(path) in warnings[0].getMessage()
    assert_bit_equal(EmbeddingCache("ns", folder, memory_items=0).get_many(KEYS[:3], never),
                     reference_rows(KEYS[:3], torch.float32))


def test_a_foreign_folder_is_refused_and_left_alone(tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(KinemaError, match="kinema did not write") as err:
        EmbeddingCache("ns", user)
    assert "\n" not in str(err.value)
    assert entry_files(user) == ["holiday.jpg"]

    # another kinema output is not a cache either
    other = tmp_path / "model"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"x")
    (other / MANIFEST).write_text(json.dumps({"kinema_output": "diffusers_model", "files": {"weights.bin": 1}}))
    with pytest.raises(KinemaError, match="another kind"):
        EmbeddingCache("ns", other)

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(KinemaError):
        EmbeddingCache("ns", a_file)
    assert a_file.read_text() == "x"

    empty = tmp_path / "empty"
    empty.mkdir()
    EmbeddingCache("ns", empty)
    assert output_kind(empty) == CACHE_KIND


def test_a_write_that_fails_leaves_memory_working(tmp_path, caplog):
    folder = tmp_path / "cache"
    cache = EmbeddingCache("ns", folder)
    (folder / "ns").write_text("in the way")  # the namespace's sub-folder cannot be made (even by root)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        got = cache.get_many(KEYS[:2], Recorder(KEYS[:2]))
    assert_bit_equal(got, reference_rows(KEYS[:2], torch.float32))
    assert len([r for r in caplog.records if "memory only" in r.getMessage()]) == 1
    assert_bit_equal(cache.get_many(KEYS[:2], never), reference_rows(KEYS[:2], torch.float32))
    assert (folder / "ns").read_text() == "in the way"


# ---------------------------------------------------------------- a real encoder


def test_slice_vae_latents_through_the_cache_equal_a_direct_encode(slice_vae, tmp_path):
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(3, 3, 1, 16, 16, generator=gen) * 2 - 1  # (B, 3, F, H, W)

    def encode(clips: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return slice_vae.encode(clips).latent_dist.mean

    direct = encode(video)
    namespace = module_fingerprint(slice_vae, settings={"sample": "mean"})
    keys = [tensor_key(clip) for clip in video]
    whole = EmbeddingCache(namespace).get_many(keys, lambda m: {"latents": encode(video[m])})
    assert torch.equal(whole["latents"], direct)
    cache = EmbeddingCache(namespace, tmp_path / "cache")
    calls = []

    def compute(missing: list[int]) -> dict[str, torch.Tensor]:
        calls.append(missing)
        return {"latents": encode(video[missing])}

    cache.get_many(keys[1:2], lambda m: {"latents": encode(video[1:2])})
    got = cache.get_many(keys, compute)
    assert calls == [[0, 2]]
    # each row is exactly what the encoder gave it, in the batch it was computed in
    assert torch.equal(got["latents"][1:2], encode(video[1:2]))
    assert torch.equal(got["latents"][[0, 2]], encode(video[[0, 2]]))
    # and so the batch is the direct encode, up to how the convolutions sum in another batch size
    torch.testing.assert_close(got["latents"], direct, rtol=0, atol=1e-6)

    restarted = EmbeddingCache(namespace, tmp_path / "cache", memory_items=0)
    assert torch.equal(restarted.get_many(keys, never)["latents"], got["latents"])
    # changed weights: another namespace, so nothing is served from the old encoder
    one_ulp_up(next(slice_vae.parameters()))
    assert module_fingerprint(slice_vae, settings={"sample": "mean"}) != namespace
