"""A method that raises on one rank only (a user's own compressor with a bug, a failed
allocation) must not leave the other ranks waiting in the bucket's collective: its payload
goes out as a FLAG_FAILED header (Random-k's allreduce: a marked status slot), every other
rank raises SenderFailedError (or, on the sharded exchange, the owner's PayloadError) naming
it, the failing rank raises its own error, no rank applies the step, and training goes on."""
import pytest

JOB = """
import torch, horovod.torch as hvd, hvd_signsgd
from hvd_signsgd.methods import SignSGD, Signum, StochasticSignMethod
from hvd_signsgd.methods.sparse import RandomK, TopK
from rankcommon import small_model, first_error, batch, digest
hvd.init()
r, n = hvd.rank(), hvd.size()
BAD_RANK, BAD_STEP = n - 1, 2

FIRED = set()

def broken(step):
    # once per method: the failed step is not counted, so the next call has the same step
    if r == BAD_RANK and step == BAD_STEP and LABEL not in FIRED:
        FIRED.add(LABEL)
        raise ValueError(f"boom on rank {r}")

class EncodeFails(SignSGD):
    def encode(self, g, state, ctx):
        broken(ctx.step)
        return super().encode(g, state, ctx)

class PrepareFails(Signum):
    def prepare(self, g, state, ctx):
        broken(ctx.step)
        return super().prepare(g, state, ctx)

class TopKFails(TopK):          # 90% of the pairs: the sum of payloads goes dense
    def encode(self, g, state, ctx):
        broken(ctx.step)
        return super().encode(g, state, ctx)

class TopKGarbles(TopK):        # a payload the sender itself cannot read back
    def encode(self, g, state, ctx):
        msg = super().encode(g, state, ctx)
        if r == BAD_RANK and ctx.step == BAD_STEP and LABEL not in FIRED:
            FIRED.add(LABEL)
            msg = msg.clone()
            msg[4:8] = torch.tensor([ctx.layout.numel + 1], dtype=torch.int32).view(torch.uint8)
        return msg

class RandomKFails(RandomK):    # an allreduce: the rank marks its status slot
    def encode(self, g, state, ctx):
        broken(ctx.step)
        return super().encode(g, state, ctx)

class NormFails(StochasticSignMethod):       # a whole-model norm: every bucket fails
    def norm_part(self, g, state, ctx):
        broken(ctx.step)
        return super().norm_part(g, state, ctx)

out = {}
for label, make, exchange in (("encode-allgather", EncodeFails, "allgather"),
                              ("encode-alltoall", EncodeFails, "alltoall"),
                              ("prepare-alltoall", lambda: PrepareFails(beta=0.5), "alltoall"),
                              ("norm-allgather", NormFails, "allgather"),
                              ("encode-sparse-dense", lambda: TopKFails(ratio=0.9), "auto"),
                              ("payload-sparse-dense", lambda: TopKGarbles(ratio=0.9), "auto"),
                              ("encode-randomk", lambda: RandomKFails(ratio=0.1), "auto")):
    LABEL = label
    m = small_model()
    opt = hvd_signsgd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01),
                                           named_parameters=m.named_parameters(),
                                           method=make(), min_compress_numel=100,
                                           exchange=exchange, num_groups=2)
    hvd.broadcast_parameters(m.state_dict(), root_rank=0)
    def one_step(k):
        x, y = batch(k, r)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    errors = [first_error(lambda: one_step(k)) for k in range(BAD_STEP)]
    before = digest(m)
    errors.append(first_error(lambda: one_step(BAD_STEP)))
    unchanged = digest(m) == before
    errors += [first_error(lambda: one_step(k)) for k in (3, 4)]
    stats = opt.compression_stats()
    out[label] = {"errors": errors, "unchanged": unchanged, "digest": digest(m),
                  "moved": digest(m) != before, "steps": stats["steps"],
                  "dense": stats.get("total_sparse_dense_buckets", 0)}
report(out)
"""


@pytest.mark.parametrize("np", [2, 3])
def test_a_method_failing_on_one_rank_fails_the_step_everywhere_without_a_hang(
        mpi_job, launcher, np):
    results = mpi_job(JOB, np=np, launcher=launcher, timeout=300).ok()
    for label in results[0]:
        for rank, res in enumerate(results):
            before, failed, after = res[label]["errors"][:2], res[label]["errors"][2], \
                res[label]["errors"][3:]
            assert before == [None, None] and after == [None, None], (label, rank, res)
            assert failed is not None, (label, rank)
            if rank == np - 1 and label == "payload-sparse-dense":
                assert failed.startswith("PayloadError") and "elements" in failed, failed
            elif rank == np - 1:
                assert failed.startswith("ValueError") and "boom" in failed, (label, failed)
            else:
                assert "PayloadError" in failed or "SenderFailedError" in failed, (label, failed)
                assert f"rank(s) [{np - 1}]" in failed, (label, failed)
            assert res[label]["unchanged"] and res[label]["moved"], (label, rank)
        assert len({res[label]["digest"] for res in results}) == 1, label
        # the failed step was not counted
        assert {res[label]["steps"] for res in results} == {4}, label
    # the sparse buckets went as the dense allreduce, whose status slots name the rank
    assert all(res[k]["dense"] >= 4 for res in results
               for k in ("encode-sparse-dense", "payload-sparse-dense"))
