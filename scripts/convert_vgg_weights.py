"""Converts ImageNet-pretrained VGG16/VGG19 weights into jipguard's VGG weights file.

    # torchvision (https://download.pytorch.org/models/vgg16-397923af.pth, or torchvision's
    # `models.vgg16(weights="IMAGENET1K_V1").state_dict()` saved with torch.save):
    python scripts/convert_vgg_weights.py --torch vgg16-397923af.pth --arch vgg16 --out vgg16_conv5_1.npz
    # Keras (keras.applications.VGG16 weights, e.g. vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5;
    # needs h5py):
    python scripts/convert_vgg_weights.py --keras vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 \
        --arch vgg16 --out vgg16_conv5_1.npz

then ``experiments/tradeoff.py --vgg_weights vgg16_conv5_1.npz``. The file holds the conv layers
conv1_1 .. conv5_1 (HWIO kernels, biases) and the input convention of the source
(torchvision: RGB [0, 1] with ImageNet mean / std; Keras: BGR [0, 255] minus the mean); see
``jipguard.ipprotect.vgg`` for the format and docs/exposure.md for the how-to. Nothing is
downloaded: you bring the file.
"""

import argparse
import sys

from jipguard.ipprotect import vgg


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--torch", help="torchvision vgg16 / vgg19 state dict (.pth)")
  src.add_argument("--keras", help="Keras VGG16 / VGG19 weights (.h5)")
  p.add_argument("--arch", default="vgg16", choices=sorted(vgg.VGG_BLOCKS))
  p.add_argument("--out", required=True, help="weights file to write (.npz)")
  a = p.parse_args(argv)
  try:
    weights = vgg.convert(a.arch, a.out, torch_path=a.torch, keras_path=a.keras)
  except (ImportError, ValueError, FileNotFoundError) as e:
    p.error(str(e))
  print(f"wrote {a.out}: {a.arch} {', '.join(weights.params)} ({weights.preprocessing} preprocessing)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
