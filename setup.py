"""CoCoRD downstream-transfer pipeline: ImageNet distillation -> Detectron2 weights -> Faster R-CNN."""
from setuptools import find_packages, setup

setup(
    name="cocord-transfer",
    version="0.1.0",
    description="Contrastive Consistent Representation Distillation (CoCoRD) with detection transfer",
    packages=find_packages(include=["cocord_common", "cocord_common.*", "cocord_pipeline", "cocord_pipeline.*",
                                    "distill", "distill.*", "transfer", "transfer.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "fvcore>=0.1.5",
        "pycocotools>=2.0.6",
        "pyyaml>=5.1",
        "tensorboard>=2.10",
        "matplotlib>=3.5",
        "numpy",
        "Pillow",
    ],
    extras_require={"test": ["pytest>=7"]},
    # the stage commands, runnable from anywhere once installed (`python <script>` from a checkout works too)
    entry_points={"console_scripts": [
        "cocord-distill-imagenet = distill.train_imagenet:cli",
        "cocord-distill-cifar = distill.train_cifar:cli",
        "cocord-convert = transfer.convert:main",
        "cocord-transfer = transfer.train_net:cli",
        "cocord-pipeline = cocord_pipeline.cli:main",
    ]},
)
