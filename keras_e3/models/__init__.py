from keras_e3.models.backbone import E3ViTBackbone
from keras_e3.models.e3vit import E3ViT
