"""Helpers imported by the snippets that tests/multirank runs on every rank."""
import hashlib
import os

import torch

# lr / momentum of the wrapped SGD per method for the small test model.
SGD_SETTINGS = {
    "none": dict(lr=0.05, momentum=0.9),
    "fp16": dict(lr=0.05, momentum=0.9),
    "signsgd": dict(lr=0.002),
    "signum": dict(lr=0.002),
    "stochastic_sign": dict(lr=0.002),
    "ssdm": dict(lr=0.002),
    "ef_signsgd": dict(lr=0.1),
    "topk": dict(lr=0.05, momentum=0.9),
    "threshold": dict(lr=0.05, momentum=0.9),
    "randomk": dict(lr=0.05, momentum=0.9),
    # ecx: the moving average v = (1 - alpha) v + alpha * update is SGD's momentum with
    # dampening; alpha = 0.1, the method's default
    "ecx": dict(lr=0.05, momentum=0.9, dampening=0.9),
}


def small_model(hidden=47, seed=0):
    """Odd sizes on purpose: 33x47 and 47x5 weights are compressed, the biases go dense."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(33, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, 5))


def batch(step, rank, n=16):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, 33, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def train(model, opt, steps, start=0, rank=0, scale=1.0):
    for k in range(start, start + steps):
        x, y = batch(k, rank)
        opt.zero_grad()
        loss = scale * torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


def digest(model):
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def first_error(fn):
    """Run fn; return 'TypeName: message' of what it raised, or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test reports whatever happened
        return f"{type(e).__name__}: {e}"
    return None


def resume_roundtrip(method, steps, rank, **options):
    """Train `steps` steps, save model + optimizer state (one file per rank), train `steps`
    more; then build everything anew, load the files and train the same `steps` steps again.
    Returns (digest of the uninterrupted run, digest of the resumed run, resumed optimizer)."""
    import hvd_signsgd

    def build():
        model = small_model()
        opt = torch.optim.SGD(model.parameters(), **SGD_SETTINGS[method])
        return model, hvd_signsgd.DistributedOptimizer(
            opt, named_parameters=model.named_parameters(), method=method,
            min_compress_numel=100, seed=11, **options)
    model, opt = build()
    train(model, opt, steps, rank=rank)
    path = os.path.join(os.environ["HVD_TEST_OUT"], f"{method}-{rank}.pt")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    train(model, opt, steps, start=steps, rank=rank)
    uninterrupted = digest(model)
    model, opt = build()                       # a new job resuming from the checkpoint
    ckpt = torch.load(path)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    train(model, opt, steps, start=steps, rank=rank)
    return uninterrupted, digest(model), opt
