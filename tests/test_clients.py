"""The libraries timm users plug models into, on tiny inputs: segmentation_models_pytorch's ``tu-`` encoders and
Hugging Face transformers' TimmWrapper (model and image processor) reading a ``ptl_timm.save_pretrained``
folder. Both find the ``ptl_*`` architectures in timm's registry, so ``import ptl_timm`` comes first."""
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import transformers
from helpers import animal_batch
from PIL import Image

import ptl_timm
from ptl_timm.data.offline import load_animal_mnist
from ptl_timm.hub.io import save_pretrained

LABELS = ['cat', 'dog', 'fish']


def test_smp_unet_with_a_ptl_encoder_trains_and_matches_the_feature_channels():
    torch.manual_seed(0)
    unet = smp.Unet('tu-ptl_resnet18', encoder_weights=None, classes=2)
    features = timm.create_model('ptl_resnet18', features_only=True)
    assert unet.encoder.out_channels == [3, *features.feature_info.channels()]
    x, _ = animal_batch(0, 2, 64)
    assert [f.shape[1] for f in unet.encoder(x)] == unet.encoder.out_channels
    unet.train()
    ptl_timm.reset_state(unet)
    out = unet(x)
    assert out.shape == (2, 2, 64, 64)
    out.square().mean().backward()
    cells = list(ptl_timm.bconv_cells(unet))
    assert all(c.conv.weight.grad.abs().sum() > 0 for c in cells), 'the segmentation loss must reach the cells'
    assert all(c.state.abs().sum() > 0 for c in cells), 'a train forward writes the latent state'
    with torch.no_grad():
        unet.eval()
        assert torch.allclose(unet(x)[:1], unet(x[:1]), atol=1e-5), 'eval is batch-independent'


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A 3-class ptl_resnet18 at 64 px with a non-trivial latent state, saved by ptl_timm.save_pretrained."""
    torch.manual_seed(0)
    model = timm.create_model('ptl_resnet18', num_classes=len(LABELS), img_size=64)
    with torch.no_grad():
        model.train()(animal_batch(0, 8, 64)[0])
    folder = tmp_path_factory.mktemp('hf') / 'ptl_resnet18'
    save_pretrained(model, folder, label_names=LABELS)
    return dict(model=model.eval(), folder=folder, x=animal_batch(100, 4, 64)[0])


def test_transformers_timm_wrapper_gives_the_ptl_logits_exactly(exported):
    model, x = exported['model'], exported['x']
    for cls in (transformers.AutoModelForImageClassification, transformers.TimmWrapperForImageClassification):
        hf = cls.from_pretrained(exported['folder']).eval()
        assert type(hf).__name__ == 'TimmWrapperForImageClassification'
        assert hf.config.id2label == dict(enumerate(LABELS))
        with torch.no_grad():
            assert torch.equal(hf(pixel_values=x).logits, model(x))
    assert all(c.state.abs().sum() > 0 for c in ptl_timm.bconv_cells(hf)), 'the latent state was loaded'
    backbone = transformers.TimmWrapperModel.from_pretrained(exported['folder']).eval()
    with torch.no_grad():
        pooled = backbone(pixel_values=x).pooler_output
        assert torch.equal(pooled, model.forward_head(model.forward_features(x), pre_logits=True))


def test_transformers_image_processor_matches_timm_preprocessing(exported):
    images, _ = load_animal_mnist()
    image = Image.fromarray(np.asarray(images[0], dtype=np.uint8)).convert('RGB')
    processor = transformers.AutoImageProcessor.from_pretrained(exported['folder'])
    pixels = processor(image, return_tensors='pt')['pixel_values']
    loaded = timm.create_model(f"local-dir:{exported['folder']}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=loaded))
    expected = transform(image).unsqueeze(0)
    assert pixels.shape == (1, 3, 64, 64) and torch.equal(pixels, expected)
    hf = transformers.AutoModelForImageClassification.from_pretrained(exported['folder']).eval()
    with torch.no_grad():
        assert torch.equal(hf(pixel_values=pixels).logits, exported['model'](expected))
