"""Small models shared by several test modules."""
import torch

from ssl_patch_analysis.models import CIFAR10_MEAN, CIFAR10_STD, ModelInfo, Preprocess, SSLModel, build_backbone, build_mlp


def tiny_model(seed: int = 0) -> SSLModel:
    """A narrow CIFAR ResNet-18 with a projector, batch-norm statistics measured on random images."""
    torch.manual_seed(seed)
    backbone, dim = build_backbone("resnet18", stem="cifar", width=0.125)
    info = ModelInfo(method="test", arch="resnet18", stem="cifar", width=0.125, embedding_dim=dim)
    model = SSLModel(backbone, build_mlp([dim, 32, 16]), preprocess=Preprocess(32, CIFAR10_MEAN, CIFAR10_STD),
                     info=info)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(64, 3, 32, 32))
    return model.eval()
