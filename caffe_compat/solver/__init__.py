"""Training as Caffe's solvers train, driven by a SolverParameter prototxt:
rules (the update arithmetic, not torch.optim), policies (learning rates), nets (what the
solver names), state (resumable snapshots), distributed (several processes), trainer
(the loop: snapshots, resume, signals, progress).
"""
from .distributed import Distributed
from .policies import LR_POLICIES, learning_rate
from .rules import SOLVER_TYPES, CaffeSolver, LearnableParam, check_solver, learnable_params, solver_type
from .state import STATE_FORMAT, STATE_VERSION
from .trainer import Trainer, TrainResult, train

__all__ = ["train", "Trainer", "TrainResult", "CaffeSolver", "LearnableParam", "learnable_params", "check_solver",
           "solver_type", "learning_rate", "Distributed", "SOLVER_TYPES", "LR_POLICIES", "STATE_FORMAT",
           "STATE_VERSION"]
