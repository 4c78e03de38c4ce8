"""Run under torchrun by test_distributed: trains through the library, as a notebook user would, and
saves what this process ended with, so that the test can compare the processes.

    torchrun --nproc-per-node=2 tests/ddp_probe.py OUT '{"model": "tutorial-cnn", "epochs": 3}'
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from cnnlab.recipes import resolve_run_config
from cnnlab.train import fit
from cnnlab.train.reporter import LineReporter

out, train = sys.argv[1], json.loads(sys.argv[2])
config = resolve_run_config({"data": {"dataset": "digits"}, "train": train, "out": out})
result = fit(config, reporter=LineReporter())
state = {name: value.cpu() for name, value in result.model.module.state_dict().items()}
torch.save({"state": state, "history": result.history}, Path(out) / f"rank{os.environ.get('RANK', 0)}.pt")
