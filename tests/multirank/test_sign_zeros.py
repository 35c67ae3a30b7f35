"""sign(0) = 0 through the real DistributedOptimizer (issue 11, ALGORITHMS.md section 11): rows of
an embedding that no rank's batch touches, the padding_idx row, a layer frozen after wrapping
and a layer the forward never uses all stay bit-identical to their initial values under every
sign method, as under Horovod; and a rank whose coordinate is 0 does not break a tie."""
import pytest

METHODS = ["signsgd", "signum", "stochastic_sign", "ssdm", "ef_signsgd", "ecx"]

EMBEDDING = """
import hashlib
import torch, horovod.torch as hvd, hvd_signsgd
hvd.init()
r, size = hvd.rank(), hvd.size()


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(1000, 16, padding_idx=0)
        self.frozen = torch.nn.Linear(16, 16)
        self.unused = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.frozen(self.emb(ids).mean(1)))


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(1, 60, (4, 3), generator=g)
    ids[:, 0] = 0                                  # padding positions in every sample
    return ids, torch.randint(0, 4, (4,), generator=g)


out = {}
for method in METHODS:
    for cap in (25.0, 1e-4):                       # one bucket; one bucket per tensor
        torch.manual_seed(0)
        model = Model()
        ecx = method == "ecx"
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9 if ecx else 0.0,
                              dampening=0.9 if ecx else 0.0)
        opt = hvd_signsgd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                               method=method, min_compress_numel=1,
                                               bucket_cap_mb=cap)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        model.frozen.requires_grad_(False)          # frozen after wrapping
        init = {k: v.clone() for k, v in model.state_dict().items()}
        touched = set()
        for step in range(4):
            for m in range(size):
                touched.update(batch(step, m)[0].reshape(-1).tolist())
            ids, y = batch(step, r)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(ids), y).backward()
            opt.step()
        never = sorted(set(range(1000)) - touched)
        moved = sorted(touched - {0})
        w, w0 = model.emb.weight.detach(), init["emb.weight"]
        same = lambda a, b: bool(torch.equal(a.view(torch.int32), b.view(torch.int32)))
        digest = hashlib.sha256(b"".join(v.numpy().tobytes()
                                         for v in model.state_dict().values())).hexdigest()
        out[f"{method}/{cap}"] = {
            "never_touched_unchanged": same(w[never], w0[never]),
            "n_never": len(never),
            "padding_unchanged": same(w[0], w0[0]),
            "frozen_unchanged": all(same(getattr(model.frozen, k).detach(), init["frozen." + k])
                                    for k in ("weight", "bias")),
            "unused_unchanged": all(same(getattr(model.unused, k).detach(), init["unused." + k])
                                    for k in ("weight", "bias")),
            "touched_moved": int((w[moved] != w0[moved]).any(1).sum()),
            "n_touched": len(moved),
            "head_moved": not same(model.head.weight.detach(), init["head.weight"]),
            "digest": digest,
        }
report(out)
"""


@pytest.mark.parametrize("np", [2, 3])
def test_untouched_rows_frozen_and_unused_layers_stay_put(mpi_job, launcher, np):
    code = f"METHODS = {METHODS!r}\n" + EMBEDDING
    results = mpi_job(code, np=np, launcher=launcher, timeout=400).ok()
    for key, res in results[0].items():
        assert {r[key]["digest"] for r in results} == {res["digest"]}, key   # ranks identical
        assert res["n_never"] > 900, key
        assert res["never_touched_unchanged"], key
        assert res["padding_unchanged"], key
        assert res["frozen_unchanged"], key
        assert res["unused_unchanged"], key
        assert res["head_moved"], key
        assert res["touched_moved"] >= res["n_touched"] // 2, (key, res)
    assert len(results[0]) == 2 * len(METHODS)


TIE = """
import torch, horovod.torch as hvd, hvd_signsgd
hvd.init()
r = hvd.rank()
x = torch.nn.Parameter(torch.zeros(8))
opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD([x], lr=0.5), named_parameters=[("x", x)],
                                       method="signsgd", min_compress_numel=1)
hvd.broadcast_parameters({"x": x}, root_rank=0)
# coordinate 0: rank 0 pushes down, rank 1 up, rank 2 has gradient exactly 0 (+0 or -0);
# coordinate 1: every rank but the last agrees, so it moves; the rest: all ranks have 0
grad = torch.zeros(8)
grad[0] = [1.0, -1.0, -0.0][r]
grad[1] = 2.0 if r < 2 else 0.0
opt.zero_grad()
(x * grad).sum().backward()
opt.step()
report(x.detach().tolist())
"""


def test_a_zero_rank_does_not_break_a_tie(mpi_job, launcher):
    for res in mpi_job(TIE, np=3, launcher=launcher, timeout=120).ok():
        assert res == [0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
