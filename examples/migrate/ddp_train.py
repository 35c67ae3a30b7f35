"""Train an MLP on scikit-learn's bundled digits with PyTorch DDP: the DDP migration example.

    torchrun --standalone --nproc-per-node 2 examples/migrate/ddp_train.py
    torchrun --standalone --nproc-per-node 2 examples/migrate/hvd_signsgd_ddp_train.py

ddp_train.py is a typical DistributedDataParallel script; hvd_signsgd_ddp_train.py is the same
script with two lines added, the import and the communication hook (README.md shows the diff).
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
torch.manual_seed(0)

# The same split on every rank; each rank trains on its own shard of the training set.
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
x, y = x[perm], y[perm]
x_test, y_test = x[:360], y[:360]
x_train, y_train = x[360:][rank::size], y[360:][rank::size]

model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                            torch.nn.Linear(128, 128), torch.nn.ReLU(),
                            torch.nn.Linear(128, 10))
model = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

batch_size, epochs = 32, 10
gen = torch.Generator().manual_seed(rank)
for epoch in range(epochs):
    order = torch.randperm(len(y_train), generator=gen)
    for i in range(len(order) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    if rank == 0:
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {accuracy:.4f}",
              flush=True)

if rank == 0:
    print(f"final test accuracy {accuracy:.4f}", flush=True)
dist.barrier()                 # no rank leaves while another is still in a collective
dist.destroy_process_group()
# torch 2.13's Gloo threads can abort the interpreter's teardown ("terminate called without an
# active exception") after a run that succeeded: leave without it
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
