"""Put on PYTHONPATH by tests that start vggft in processes of their own (torchrun's workers too): every
such Python process builds the tiny stand-in VGG instead of torchvision's full one, as the in-process
tests do. Nothing outside the tests puts this folder on a path.
"""

import os
import sys

if os.environ.get("VGGFT_TEST_TINY"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for tiny.py
    import vggft.model.build
    from tiny import tiny_vgg

    vggft.model.build.vgg = tiny_vgg
