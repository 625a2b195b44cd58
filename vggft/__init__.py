"""vggft: fine-tune ImageNet-pretrained VGG networks on a folder of labelled images."""

__version__ = "0.1.0"
