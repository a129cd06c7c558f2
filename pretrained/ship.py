"""Turn a training run's checkpoint into a shipped model: float16, the project's own format.

    python pretrained/ship.py runs/vicreg/checkpoint.pt pretrained/vicreg-resnet18-cifar10.pt
"""
import sys

from ssl_patch_analysis.checkpoints import load_model, save_checkpoint

if __name__ == "__main__":
    source, target = sys.argv[1:3]
    model = load_model(source)
    save_checkpoint(model, target, train=model.info.extra["train"], half=True)
