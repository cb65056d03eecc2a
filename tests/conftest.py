import sys
from pathlib import Path

# Let tests import the independent reference implementations beside them.
sys.path.insert(0, str(Path(__file__).parent))
