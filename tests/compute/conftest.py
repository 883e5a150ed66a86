"""One torch thread in these tests (two CPU cores are shared with other work), except where a
test is about threads."""

import torch

torch.set_num_threads(1)
