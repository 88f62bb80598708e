"""Make the repository's top-level modules (main, losses, dataset_loader, networks, util) importable."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
