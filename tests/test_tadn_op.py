"""chunk_tadn against the step-by-step oracle: values, final states and every gradient.

Error measure throughout: ``rel(a, b) = max|a - b| / max|b|`` over the whole tensor, with ``b`` the
reference. The kernel runs in fp32; the oracle runs on the same data in fp64 (naive_recurrent_tadn
computes in fp64 for fp64 inputs), so the measured error is the kernel's own.
"""

import math
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

import torchrec_hytrec.ops.tadn.chunk as chunk_module
from torchrec_hytrec.ops.jagged_attention import JaggedLayout
from torchrec_hytrec.ops.tadn import chunk_tadn, naive_recurrent_tadn
from torchrec_hytrec.ops.tadn.chunk import _exp_or_zero

TOL = 1e-4
MIXED = [1, 7, 63, 64, 65, 0, 300, 1000]
INPUTS = ("q", "k", "v", "log_alpha", "beta", "initial_state")


@pytest.fixture(autouse=True)
def one_thread():
    # The oracle is thousands of tiny ops; on a shared 2-core machine a second OpenMP thread
    # only adds synchronisation (measured 10x slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(
    lengths: Sequence[int], heads: int, dim: int, seed: int = 0, with_initial_state: bool = True
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """fp64 inputs of a jagged batch and its offsets; log_alpha spans [-4, 0], beta [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    T, B = sum(lengths), len(lengths)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    inputs = {
        "q": F.normalize(rnd(T, heads, dim), dim=-1),
        "k": F.normalize(rnd(T, heads, dim), dim=-1),
        "v": rnd(T, heads, dim),
        "log_alpha": -4 * torch.rand(T, heads, generator=g, dtype=torch.float64) ** 4,
        "beta": torch.rand(T, heads, generator=g, dtype=torch.float64),
    }
    if with_initial_state:
        inputs["initial_state"] = rnd(B, heads, dim, dim)
    offsets = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    return inputs, offsets


def run_with_grads(
    op, inputs: Dict[str, torch.Tensor], offsets: torch.Tensor, dtype: torch.dtype, **kwargs
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Runs ``op`` in ``dtype`` and back-propagates fixed random cotangents of o and final state."""
    leaves = {name: x.detach().to(dtype).requires_grad_() for name, x in inputs.items()}
    o, final = op(**leaves, offsets=offsets, output_final_state=True, **kwargs)
    g = torch.Generator().manual_seed(123)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    dfinal = torch.randn(final.shape, generator=g, dtype=torch.float64).to(final.dtype)
    torch.autograd.backward([o, final], [do, dfinal])
    return o.detach(), final.detach(), {name: x.grad for name, x in leaves.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_matches_oracle(
    inputs: Dict[str, torch.Tensor], offsets: torch.Tensor, tol: float = TOL, **kwargs
) -> None:
    oracle_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    o_ref, s_ref, g_ref = run_with_grads(
        naive_recurrent_tadn, inputs, offsets, torch.float64, **oracle_kwargs
    )
    o, s, grads = run_with_grads(chunk_tadn, inputs, offsets, torch.float32, **kwargs)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    errors = {"o": rel(o, o_ref), "final_state": rel(s, s_ref)}
    errors.update({f"d{name}": rel(grads[name], g_ref[name]) for name in inputs})
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_mixed_lengths_match_oracle(heads: int, dim: int) -> None:
    inputs, offsets = make_inputs(MIXED, heads, dim, seed=heads * 100 + dim)
    assert_matches_oracle(inputs, offsets)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_sizes_and_scale_match_oracle(chunk_size: int) -> None:
    inputs, offsets = make_inputs([1, 15, 16, 17, 33, 100, 130], 2, 16, seed=chunk_size)
    assert_matches_oracle(inputs, offsets, chunk_size=chunk_size, scale=0.3)


def test_without_initial_state_matches_oracle() -> None:
    inputs, offsets = make_inputs([5, 70, 0, 129], 2, 16, with_initial_state=False)
    assert_matches_oracle(inputs, offsets)


@pytest.mark.parametrize("lengths", [[9, 0, 16, 17, 40, 3, 33], [3, 9, 16, 1]])
def test_users_starting_from_zeros_match_oracle(lengths: List[int]) -> None:
    # Without initial states the first chunk of every user reads no state and its products with
    # one are left out; the second case has only first chunks.
    inputs, offsets = make_inputs(lengths, 2, 16, seed=len(lengths), with_initial_state=False)
    assert_matches_oracle(inputs, offsets, chunk_size=16)
    # Training asks for no final state: the gradients of the outputs alone.
    grads = {}
    for op, dtype in ((naive_recurrent_tadn, torch.float64), (chunk_tadn, torch.float32)):
        leaves = {n: x.detach().to(dtype).requires_grad_() for n, x in inputs.items()}
        kwargs = {"chunk_size": 16} if op is chunk_tadn else {}
        o, final = op(**leaves, offsets=offsets, **kwargs)
        assert final is None
        o.backward(torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape).to(dtype))
        grads[op] = {"o": o.detach(), **{n: x.grad for n, x in leaves.items()}}
    errors = {n: rel(grads[chunk_tadn][n], grads[naive_recurrent_tadn][n]) for n in grads[chunk_tadn]}
    assert max(errors.values()) <= TOL, errors


def test_each_user_equals_running_alone() -> None:
    lengths = [300, 1, 0, 65, 64, 7, 130]
    inputs, offsets = make_inputs(lengths, 2, 16, seed=7)
    fp32 = {n: x.float() for n, x in inputs.items()}
    o, s = chunk_tadn(**fp32, offsets=offsets, output_final_state=True)
    for b, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        alone = {n: (x[b : b + 1] if n == "initial_state" else x[lo:hi]) for n, x in fp32.items()}
        o_b, s_b = chunk_tadn(**alone, offsets=torch.tensor([0, hi - lo]), output_final_state=True)
        torch.testing.assert_close(o[lo:hi], o_b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s[b : b + 1], s_b, rtol=1e-6, atol=1e-6)


def test_a_shared_layout_plans_once_and_changes_nothing(monkeypatch) -> None:
    inputs, offsets = make_inputs([5, 70, 0, 129], 2, 16, seed=4)
    fp32 = {n: x.float() for n, x in inputs.items()}
    o, s = chunk_tadn(**fp32, offsets=offsets, output_final_state=True, chunk_size=16)
    plans, build = [], chunk_module._plan_chunks

    def counting(*args):
        plans.append(build(*args))
        return plans[-1]

    monkeypatch.setattr(chunk_module, "_plan_chunks", counting)
    layout = JaggedLayout(offsets)
    for _ in range(2):
        o_l, s_l = chunk_tadn(**fp32, offsets=offsets, output_final_state=True, chunk_size=16, layout=layout)
        assert torch.equal(o_l, o) and torch.equal(s_l, s)
    assert len(plans) == 1
    chunk_tadn(**fp32, offsets=offsets, chunk_size=32, layout=layout)  # another plan
    assert len(plans) == 2


def test_gradients_of_each_user_are_independent_of_the_batch() -> None:
    lengths = [130, 0, 64, 9]
    inputs, offsets = make_inputs(lengths, 2, 16, seed=11)
    leaves = {n: x.float().requires_grad_() for n, x in inputs.items()}
    o, s = chunk_tadn(**leaves, offsets=offsets, output_final_state=True)
    # Only user 2's outputs and state carry a loss: nothing may flow into the other users.
    lo, hi = offsets[2].item(), offsets[3].item()
    (o[lo:hi].square().sum() + s[2].square().sum()).backward()
    alone = {
        n: (x[2:3] if n == "initial_state" else x[lo:hi]).float().requires_grad_() for n, x in inputs.items()
    }
    o_b, s_b = chunk_tadn(**alone, offsets=torch.tensor([0, hi - lo]), output_final_state=True)
    (o_b.square().sum() + s_b.square().sum()).backward()
    for name in INPUTS:
        grad = leaves[name].grad
        first, last = (2, 3) if name == "initial_state" else (lo, hi)
        torch.testing.assert_close(grad[first:last], alone[name].grad, rtol=1e-5, atol=1e-6)
        others = torch.cat([grad[:first], grad[last:]])
        assert others.abs().max().item() == 0.0, name


def test_extreme_gates_match_oracle() -> None:
    lengths = [1, 63, 64, 65, 300]
    inputs, offsets = make_inputs(lengths, 2, 16, seed=3)
    T = sum(lengths)
    i = torch.arange(T, dtype=torch.float64)[:, None].expand(T, 2)
    # Year-long gaps against hour-scale constants (-1e4), no decay at all (0), and beta at its
    # bounds, interleaved so every chunk sees all of them.
    no_decay = torch.where(i % 3 == 0, 0.0, -0.1)
    inputs["log_alpha"] = torch.where(i % 5 == 0, -1e4, no_decay).contiguous()
    inputs["beta"] = torch.where(i % 4 == 0, 0.0, torch.where(i % 4 == 1, 1.0, 0.5)).contiguous()
    assert_matches_oracle(inputs, offsets)


def test_no_decay_full_writes_and_repeated_keys_match_oracle() -> None:
    # log_alpha = 0, beta = 1 and one key repeated: (I + A) is then as far from I as it gets.
    inputs, offsets = make_inputs([200, 64], 1, 16, seed=5)
    inputs["log_alpha"].zero_()
    inputs["beta"].fill_(1.0)
    inputs["k"][::2] = inputs["k"][0]
    assert_matches_oracle(inputs, offsets)


@pytest.mark.slow
def test_16k_sequence_matches_oracle() -> None:
    # The whole 16,384-event sequence is compared (every output, the final state and every
    # gradient), against the fp64 oracle on the same data; one head of dim 16 keeps the oracle
    # affordable.
    inputs, offsets = make_inputs([16384], 1, 16, seed=16)
    inputs["log_alpha"][::97] = -1e4
    assert_matches_oracle(inputs, offsets)


@pytest.mark.parametrize("lengths", [[0, 3, 0], [0, 0]])
def test_zero_length_users_keep_their_initial_state(lengths: List[int]) -> None:
    inputs, offsets = make_inputs(lengths, 2, 8, seed=1)
    leaves = {n: x.float().requires_grad_() for n, x in inputs.items()}
    o, s = chunk_tadn(**leaves, offsets=offsets, output_final_state=True)
    assert o.shape == (sum(lengths), 2, 8)
    empty = [b for b, n in enumerate(lengths) if n == 0]
    torch.testing.assert_close(s[empty], leaves["initial_state"][empty].detach())
    dfinal = torch.randn(s.shape)
    torch.autograd.backward([o, s], [torch.ones_like(o), dfinal])
    torch.testing.assert_close(leaves["initial_state"].grad[empty], dfinal[empty])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decay_exponentials_stay_normal_and_underflow_to_exact_zeros(dtype: torch.dtype) -> None:
    # Every argument exp sees is clamped to a value whose exp is still a normal number (a
    # denormal result puts CPU exp on a path ~30x slower); what lies below becomes exactly 0.
    tiny = torch.finfo(dtype).tiny
    x = torch.cat(
        [
            torch.tensor([-1e4, float(torch.finfo(dtype).min)], dtype=dtype),
            torch.linspace(-800.0, 0.0, 20_001, dtype=dtype),
        ]
    )
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[-1] = True
    y = _exp_or_zero(x, mask)
    assert bool(((y == 0) | (y >= tiny)).all())
    assert y[-1] == 0 and y[0] == 0
    kept = x[:-1] > math.log(tiny) + 1.0
    torch.testing.assert_close(y[:-1][kept], x[:-1][kept].exp())
    assert bool((y[:-1][~kept] == 0).all())


def test_low_precision_inputs_accumulate_in_fp32() -> None:
    inputs, offsets = make_inputs([70, 5], 2, 16, seed=9)
    o_ref, s_ref = naive_recurrent_tadn(**inputs, offsets=offsets, output_final_state=True)
    bf16 = {n: x.bfloat16() for n, x in inputs.items()}
    o, s = chunk_tadn(**bf16, offsets=offsets, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel(o, o_ref) < 3e-2 and rel(s, s_ref) < 3e-2


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d, off: (d, torch.tensor([0, 3, 9])), "end at the number of events"),
        (lambda d, off: (d, torch.tensor([0, 6, 4, 10])), "user 1"),
        (lambda d, off: ({**d, "beta": d["beta"][:, :1]}, off), "beta must be"),
        (lambda d, off: ({**d, "v": d["v"][:5]}, off), "v must be"),
        (lambda d, off: ({**d, "initial_state": d["initial_state"][:1]}, off), "initial_state must be"),
    ],
)
def test_bad_inputs_are_named(change, message: str) -> None:
    inputs, offsets = make_inputs([4, 6], 2, 8)
    inputs, offsets = change(inputs, offsets)
    with pytest.raises(ValueError, match=message):
        chunk_tadn(**inputs, offsets=offsets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_oracle() -> None:
    inputs, offsets = make_inputs(MIXED, 2, 64, seed=42)
    o_ref, s_ref, g_ref = run_with_grads(naive_recurrent_tadn, inputs, offsets, torch.float64)
    cuda = {n: x.cuda() for n, x in inputs.items()}
    o, s, grads = run_with_grads(chunk_tadn, cuda, offsets.cuda(), torch.float32)
    assert o.is_cuda and s.is_cuda
    errors = {"o": rel(o.cpu(), o_ref), "final_state": rel(s.cpu(), s_ref)}
    errors.update({f"d{n}": rel(grads[n].cpu(), g_ref[n]) for n in inputs})
    # TF32 may be on for CUDA matmuls; the bound is the same as on CPU when it is off.
    assert max(errors.values()) <= TOL, errors
