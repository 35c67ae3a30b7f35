"""Train an MLP on scikit-learn's bundled digits with Horovod: the migration example.

    horovodrun -np 2 -H localhost:2 python examples/migrate/horovod_train.py
    horovodrun -np 2 -H localhost:2 python examples/migrate/hvd_signsgd_train.py

horovod_train.py is a typical Horovod PyTorch script; hvd_signsgd_train.py is the same script
with two lines changed, the import and the optimizer wrapper (README.md shows the diff).
"""
import horovod.torch as hvd
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

hvd.init()
torch.set_num_threads(1)
torch.manual_seed(0)

# The same split on every rank; each rank trains on its own shard of the training set.
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
x, y = x[perm], y[perm]
x_test, y_test = x[:360], y[:360]
x_train, y_train = x[360:][hvd.rank()::hvd.size()], y[360:][hvd.rank()::hvd.size()]

model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                            torch.nn.Linear(128, 128), torch.nn.ReLU(),
                            torch.nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

batch_size, epochs = 32, 10
gen = torch.Generator().manual_seed(hvd.rank())
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
    if hvd.rank() == 0:
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {accuracy:.4f}",
              flush=True)

if hvd.rank() == 0:
    print(f"final test accuracy {accuracy:.4f}", flush=True)
