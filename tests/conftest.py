"""Make the repository's top-level modules (main, losses, dataset_loader, networks, util) importable; fixtures
shared by several test files."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def train_split():
    """A 4-class training split of 16 images per class (helpers.tiny_trainer's)."""
    from helpers import make_synthetic

    train, _ = make_synthetic(num_classes=4, n_train_per_class=16, n_test_per_class=2)
    return train
