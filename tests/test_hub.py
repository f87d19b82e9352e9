"""Hub I/O: export a fine-tuned PTL model, load it back from a real-layout Hub cache (offline), by registered
tag, ``hf-hub:`` and ``local-dir:``, bit-exactly; the errors users meet; the weights manifest and its cards."""
import hashlib
import importlib.util
import json
import logging
import re
import shutil
import time
from pathlib import Path

import pytest
import timm
import torch
from helpers import animal_batch, place_in_hf_cache, train_and_save
from huggingface_hub import constants as hf_constants
from huggingface_hub import scan_cache_dir
from safetensors.torch import load_file, save_file
from timm.models import get_pretrained_cfg

import ptl_timm  # noqa: F401
from ptl_timm import bconv_cells
from ptl_timm.hub import HubError
from ptl_timm.hub.checkpoint import file_sha256
from ptl_timm.hub.io import export_checkpoint, load_model, save_pretrained
from ptl_timm.hub.manifest import MANIFEST_PATH, load_manifest
from ptl_timm.hub.model_card import manifest_table, render_zoo

TAG = next(iter(load_manifest()), None)
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """The manifest tag's architecture and model_args, fine-tuned a few steps on real images with EMA, saved
    by timm's CheckpointSaver (train.py's format) and exported. The latent state is non-trivial."""
    entry = load_manifest()[TAG]
    arch, model_args = entry['config']['architecture'], dict(entry['config']['model_args'])
    size = model_args['img_size'][0]
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=entry['config']['num_classes'], **model_args)
    root = tmp_path_factory.mktemp('export')
    ema = train_and_save(model, arch, dict(img_size=size), root, momentum=0.9)
    checkpoint = root / 'last.pth.tar'
    summary = export_checkpoint(checkpoint, root / 'folder', repo_id=entry['hf_hub_id'])
    x_eval, _ = animal_batch(1000, 8, size)
    with torch.no_grad():
        expected = model.eval()(x_eval)
    return dict(entry=entry, model=model, ema=ema.module, checkpoint=checkpoint, folder=root / 'folder',
                summary=summary, x=x_eval, expected=expected)


def test_export_writes_hub_folder_with_ptl_model_args_and_nontrivial_state(exported):
    folder, model = exported['folder'], exported['model']
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    ordinary = folder.parent / 'ordinary.txt'  # the mode any new file gets under this process's umask
    ordinary.write_text('')
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == dict.fromkeys(
        ['README.md', 'config.json', 'model.safetensors'], ordinary.stat().st_mode & 0o777)
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == exported['entry']['config']['architecture']
    assert config['model_args']['cell_widths'] == list(model.cell_widths)
    assert config['model_args']['state_mode'] == model.state_mode
    assert config['model_args']['img_size'] == list(model.img_size)
    # num_classes only at the root: transformers' TimmWrapper passes it beside model_args (test_clients.py)
    assert config['num_classes'] == model.num_classes and 'num_classes' not in config['model_args']
    weights = load_file(str(folder / 'model.safetensors'))
    assert weights.keys() == model.state_dict().keys()
    states = [k for k in weights if k.endswith('.state')]
    assert states and all(weights[k].abs().sum() > 0 for k in states), 'training left the latent state at zero'
    assert any(k.endswith('.state_frozen') for k in weights)
    for name, digest in exported['summary']['files'].items():
        assert file_sha256(folder / name) == digest
    assert exported['summary']['weights'] == 'state_dict'
    card = (folder / 'README.md').read_text()
    assert f"hf-hub:{exported['entry']['hf_hub_id']}" in card and 'import ptl_timm' in card


@pytest.mark.slow
def test_load_by_registered_tag_hf_hub_and_local_dir_is_bit_exact(exported, offline_cache):
    entry = exported['entry']
    repo = place_in_hf_cache(exported['folder'], entry['hf_hub_id'], offline_cache)
    assert [r.repo_id for r in scan_cache_dir(offline_cache).repos] == [entry['hf_hub_id']]  # a layout hf reads
    assert get_pretrained_cfg(TAG).hf_hub_id == entry['hf_hub_id']
    for name in (TAG, f"hf-hub:{entry['hf_hub_id']}", f"local-dir:{exported['folder']}",
                 f"local-dir:{next((repo / 'snapshots').iterdir())}"):
        loaded = timm.create_model(name, pretrained=True).eval()
        with torch.no_grad():
            out = loaded(exported['x'])
        assert torch.equal(out, exported['expected']), name
        for k, v in exported['model'].state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), f'{name}: {k}'


def test_full_ptl_tag_with_other_num_classes_resets_only_the_head(exported, offline_cache):
    place_in_hf_cache(exported['folder'], exported['entry']['hf_hub_id'], offline_cache)
    loaded = timm.create_model(TAG, pretrained=True, num_classes=3)
    trained = exported['model'].state_dict()
    got = loaded.state_dict()
    assert got['fc.weight'].shape[0] == 3
    assert all(torch.equal(got[k], v) for k, v in trained.items() if not k.startswith('fc.'))


def test_backbone_only_start_logs_fresh_ptl_tensors_full_ptl_start_does_not(exported, tmp_path, caplog):
    trained = exported['model']
    plain = tmp_path / 'plain.safetensors'
    save_file(trained.backbone.state_dict(), str(plain))
    with caplog.at_level(logging.INFO, logger='ptl_timm'):
        backbone_only = timm.create_model(trained.pretrained_cfg['architecture'], pretrained=True, num_classes=10,
                                          img_size=64, pretrained_cfg_overlay=dict(file=str(plain)))
    assert re.search(r'PTL tensors start fresh \(.*cells.*\)', caplog.text)
    assert all(torch.equal(v, trained.state_dict()[f'backbone.{k}']) for k, v in
               backbone_only.backbone.state_dict().items())
    assert all(float(c.state.abs().sum()) == 0 for c in bconv_cells(backbone_only))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='ptl_timm'):
        full = timm.create_model(f"local-dir:{exported['folder']}", pretrained=True)
    assert 'start fresh' not in caplog.text
    assert all(float(c.state.abs().sum()) > 0 for c in bconv_cells(full))


def test_export_ema_bare_state_dict_and_safetensors(exported, tmp_path):
    summary = export_checkpoint(exported['checkpoint'], tmp_path / 'ema', use_ema=True)
    assert summary['weights'] == 'state_dict_ema'
    ema_weights = load_file(str(tmp_path / 'ema' / 'model.safetensors'))
    assert all(torch.equal(ema_weights[k], v) for k, v in exported['ema'].state_dict().items())
    assert not torch.equal(ema_weights['fc.weight'], exported['model'].state_dict()['fc.weight'])

    arch, size = exported['entry']['config']['architecture'], exported['model'].img_size[0]
    bare = tmp_path / 'bare.pth'
    torch.save({f'module.{k}': v for k, v in exported['model'].state_dict().items()}, bare)  # a DDP state_dict
    safe = tmp_path / 'weights.safetensors'
    save_file(exported['model'].state_dict(), str(safe))
    for source in (bare, safe):
        with pytest.raises(HubError, match='pass model_name'):
            export_checkpoint(source, tmp_path / 'x')
        out = tmp_path / source.stem
        export_checkpoint(source, out, model_name=arch, model_kwargs=dict(img_size=size))
        loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
        with torch.no_grad():
            assert torch.equal(loaded(exported['x']), exported['expected'])
    with pytest.raises(HubError, match='no EMA weights'):
        export_checkpoint(bare, tmp_path / 'y', model_name=arch, use_ema=True)


def test_cell_norm_is_part_of_the_exported_model_args(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('ptl_resnet18', num_classes=3, img_size=64, cell_norm=True)
    x, _ = animal_batch(0, 8, 64)
    model.train()(x)  # moves the running statistics of the cell norm off their initial values
    save_pretrained(model, tmp_path / 'normed')
    assert json.loads((tmp_path / 'normed' / 'config.json').read_text())['model_args']['cell_norm'] is True
    loaded = timm.create_model(f"local-dir:{tmp_path / 'normed'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_export_refuses_wrong_settings_and_plain_backbone(exported, tmp_path):
    arch = exported['entry']['config']['architecture']
    safe = tmp_path / 'weights.safetensors'
    save_file(exported['model'].state_dict(), str(safe))
    # img_size gives the state grid: the default (224) cannot hold a 64 px state
    with pytest.raises(ValueError, match=r'(?s)cells\.0\.0\.state: checkpoint .* vs model .*model_kwargs=dict\('):
        export_checkpoint(safe, tmp_path / 'a', model_name=arch)
    plain = tmp_path / 'plain.safetensors'
    save_file(exported['model'].backbone.state_dict(), str(plain))
    with pytest.raises(HubError, match='plain backbone checkpoint'):
        export_checkpoint(plain, tmp_path / 'b', model_name=arch)
    with pytest.raises(HubError, match='not a model ptl_timm registers'):
        export_checkpoint(safe, tmp_path / 'c', model_name='resnet18')


def test_offline_cache_miss_names_repo_cache_dir_and_offline_mode(offline_cache):
    with pytest.raises(HubError) as err:
        load_model('hf-hub:someone/ptl_resnet18.missing')
    msg = str(err.value)
    assert 'someone/ptl_resnet18.missing' in msg and str(offline_cache) in msg and 'HF_HUB_OFFLINE' in msg
    entry = load_manifest()[TAG]
    with pytest.raises(HubError) as err:  # a registered full-PTL tag whose repo is not cached
        load_model(TAG)
    msg = str(err.value)
    assert entry['hf_hub_id'] in msg and str(offline_cache) in msg and 'HF_HUB_OFFLINE' in msg
    if entry['status'] != 'published':
        assert entry['command'] in msg


def _assert_names_every_fix(message: str, cache: Path) -> None:
    for needle in ('HF_HUB_OFFLINE=1', str(cache), 'local-dir:PATH', 'pretrained_cfg_overlay=dict(file=PATH)'):
        assert needle in message, (needle, message)


@pytest.mark.parametrize('name', ['ptl_resnet18', 'ptl_resnet50.a1_in1k', 'ptl_mgn_resnet50', 'reid_ptl_resnet18'])
def test_pretrained_load_offline_fails_at_once_naming_the_fixes(name, offline_cache):
    """timm's own create_model, an empty Hub cache, offline mode: one error, without the Hub's retries."""
    start = time.monotonic()
    with pytest.raises(HubError) as err:
        timm.create_model(name, pretrained=True, num_classes=3)
    assert time.monotonic() - start < 10
    _assert_names_every_fix(str(err.value), offline_cache)
    assert 'HF_HUB_OFFLINE=1 (offline mode)' in str(err.value)


def test_pretrained_load_without_network_fails_at_once_without_offline_mode(offline_cache, monkeypatch):
    """HF_HUB_OFFLINE unset but no Hub to reach (a closed port on this machine): the same error, at once."""
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(hf_constants, 'ENDPOINT', 'http://127.0.0.1:9')
    for var in ('https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(HubError, match='cannot be reached') as err:
        timm.create_model('ptl_resnet18.a1_in1k', pretrained=True)
    assert time.monotonic() - start < 10
    _assert_names_every_fix(str(err.value), offline_cache)


def test_pretrained_backbone_weights_in_the_hub_cache_load_offline(offline_cache, tmp_path):
    """The check lets a cached file through to timm's loader: ptl_resnet18.a1_in1k reads timm/resnet18.a1_in1k."""
    torch.manual_seed(3)
    plain = timm.create_model('resnet18')
    (tmp_path / 'w').mkdir()
    save_file(plain.state_dict(), str(tmp_path / 'w' / 'model.safetensors'))
    place_in_hf_cache(tmp_path / 'w', 'timm/resnet18.a1_in1k', offline_cache)
    model = timm.create_model('ptl_resnet18.a1_in1k', pretrained=True, num_classes=3, img_size=64)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.backbone.state_dict().items())


def _copy_with_config(folder: Path, dst: Path, **changes) -> Path:
    shutil.copytree(folder, dst)
    config = json.loads((dst / 'config.json').read_text())
    for key, value in changes.items():
        if key == 'architecture':
            config['architecture'] = value
        else:
            config['model_args'][key] = value
    (dst / 'config.json').write_text(json.dumps(config))
    return dst


def test_configs_written_before_num_classes_left_model_args_still_load(exported, tmp_path):
    folder = _copy_with_config(exported['folder'], tmp_path / 'old', num_classes=exported['model'].num_classes)
    for loaded in (timm.create_model(f'local-dir:{folder}', pretrained=True), load_model(f'local-dir:{folder}')):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(exported['x']), exported['expected'])


def test_unregistered_architecture_tells_to_import_ptl_timm(exported, tmp_path, offline_cache):
    folder = _copy_with_config(exported['folder'], tmp_path / 'x', architecture='ptl_not_registered')
    with pytest.raises(ValueError, match=r"'ptl_not_registered'.*import ptl_timm"):
        load_model(f'local-dir:{folder}')
    place_in_hf_cache(folder, 'someone/x', offline_cache)
    with pytest.raises(ValueError, match=r"'ptl_not_registered'.*import ptl_timm"):
        load_model('hf-hub:someone/x')


def test_other_cell_widths_or_architecture_list_mismatching_keys(exported, tmp_path):
    widths = [w * 2 for w in exported['model'].cell_widths]
    folder = _copy_with_config(exported['folder'], tmp_path / 'widths', cell_widths=widths)
    with pytest.raises(ValueError, match=r'cell widths .*\n  (cells|fuses)\.\S+: checkpoint \('):
        load_model(f'local-dir:{folder}')
    folder = _copy_with_config(exported['folder'], tmp_path / 'arch', architecture='ptl_resnet18')
    with pytest.raises(ValueError, match=r'backbone resnet18[\s\S]*\n  missing backbone\.conv1\.weight'):
        load_model(f'local-dir:{folder}')


@pytest.mark.parametrize('damage', ['truncated', 'header'])
def test_corrupted_weights_are_named_with_their_sha256(exported, tmp_path, offline_cache, damage):
    folder = shutil.copytree(exported['folder'], tmp_path / 'copy')
    repo = place_in_hf_cache(folder, 'someone/damaged', offline_cache)
    good = (folder / 'model.safetensors').read_bytes()
    bad = good[:len(good) // 2] if damage == 'truncated' else b'\xff' * 16 + good[16:]
    blob = next(p for p in (repo / 'blobs').iterdir() if len(p.name) == 64)
    blob.write_bytes(bad)  # damaged after download: the blob keeps the name of its published sha256
    with pytest.raises(HubError) as err:
        load_model('hf-hub:someone/damaged')
    msg = str(err.value)
    assert 'corrupted or truncated' in msg and hashlib.sha256(bad).hexdigest() in msg and blob.name in msg
    (folder / 'model.safetensors').write_bytes(bad)
    with pytest.raises(HubError, match=r'model\.safetensors is corrupted or truncated'):
        load_model(f'local-dir:{folder}')


# --- the weights manifest, the registered tags and the cards ------------------------------------------------
def test_manifest_entries_are_registered_tags_pointing_at_their_repo():
    manifest = load_manifest()
    assert manifest, 'weights/manifest.json lists no checkpoint'
    for name, entry in manifest.items():
        cfg = get_pretrained_cfg(name)
        assert cfg is not None and cfg.hf_hub_id == entry['hf_hub_id'] and cfg.hf_hub_filename == 'model.safetensors'
        assert cfg.num_classes == entry['config']['num_classes']
        assert tuple(cfg.input_size) == tuple(entry['config']['pretrained_cfg']['input_size'])
        arch = name.split('.')[0]
        assert timm.is_model(arch) and name in timm.list_pretrained(f'{arch}.*')
        # a manifest tag is never the default: pretrained=True without a tag still means backbone weights
        assert timm.models.get_arch_pretrained_cfgs(arch) and next(iter(timm.models.get_arch_pretrained_cfgs(
            arch))) != name
        if entry['status'] == 'published':
            assert re.fullmatch(r'[0-9a-f]{64}', entry['files']['model.safetensors']['sha256'])


def test_manifest_configs_match_what_export_writes_today(tmp_path):
    """The config.json of each entry must be what this code exports for its model_args, so a change of the
    package (defaults, timm version) that would alter the published checkpoints is caught."""
    for name, entry in load_manifest().items():
        config = entry['config']
        model = timm.create_model(config['architecture'], num_classes=config['num_classes'], **config['model_args'])
        pcfg = config['pretrained_cfg']
        save_pretrained(model, tmp_path / name, license=pcfg.get('license'), data_config=dict(
            input_size=pcfg['input_size'], mean=pcfg['mean'], std=pcfg['std'], crop_pct=pcfg['crop_pct'],
            interpolation=pcfg['interpolation']))
        assert json.loads((tmp_path / name / 'config.json').read_text()) == config


def test_zoo_folders_cards_and_readme_table_are_generated_from_the_manifest():
    files = render_zoo()
    folders = {p.parent.name for p in files}
    assert folders == set(load_manifest())
    on_disk = {p.name for p in (REPO_ROOT / 'weights').iterdir() if p.is_dir() and not p.name.startswith(('.', '_'))}
    assert on_disk == folders, 'weights/ folders without a manifest entry (or the reverse)'
    for path, text in files.items():
        assert path.read_text() == text, f'{path} is stale: run python weights/zoo.py'
    for name, entry in load_manifest().items():
        card = files[REPO_ROOT / 'weights' / name / 'README.md']
        for needle in (entry['status'], entry['command'], entry['data']['licence'],
                       entry['backbone_weights']['licence'], f"hf-hub:{entry['hf_hub_id']}"):
            assert needle in card
    hub_doc = (REPO_ROOT / 'docs' / 'hub.md').read_text()
    assert f'<!-- manifest-table -->\n{manifest_table()}<!-- /manifest-table -->' in hub_doc, \
        'docs/hub.md table is stale: run python weights/zoo.py'


def test_manifest_validation_rejects_bad_entries(tmp_path):
    good = json.loads(MANIFEST_PATH.read_text())
    entry = good['checkpoints'][0]
    cases = {
        'status': (dict(entry, status='released'), 'status'),
        'sha': (dict(entry, status='published', files=None), 'published without the sha256'),
        'arch': (dict(entry, name='ptl_resnet18.x'), 'config architecture'),
        'missing': ({k: v for k, v in entry.items() if k != 'command'}, 'missing command'),
    }
    for key, (bad, match) in cases.items():
        path = tmp_path / f'{key}.json'
        path.write_text(json.dumps(dict(good, checkpoints=[bad])))
        with pytest.raises(ValueError, match=match):
            load_manifest(path)


def _zoo_script():
    spec = importlib.util.spec_from_file_location('weights_zoo', REPO_ROOT / 'weights' / 'zoo.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_maintainer_zoo_script_checks_renders_and_prints_the_table(tmp_path, capsys):
    zoo = _zoo_script()
    assert zoo.main(['--check']) == 0 and 'up to date' in capsys.readouterr().out
    assert zoo.main(['--table']) == 0 and capsys.readouterr().out == manifest_table()
    doc = tmp_path / 'doc.md'
    doc.write_text('before\n<!-- manifest-table -->\nold table\n<!-- /manifest-table -->\nafter\n')
    assert zoo.main(['--check', '--docs', str(doc)]) == 1 and str(doc) in capsys.readouterr().err
    # a copy of the manifest in tmp_path: its cards are written there, never into the repository
    manifest = tmp_path / 'weights' / 'manifest.json'
    manifest.parent.mkdir()
    manifest.write_text(MANIFEST_PATH.read_text())
    assert zoo.main(['--manifest', str(manifest), '--docs', str(doc)]) == 0
    assert doc.read_text() == f'before\n<!-- manifest-table -->\n{manifest_table()}<!-- /manifest-table -->\nafter\n'
    assert {p.name for p in (tmp_path / 'weights').rglob('*') if p.is_file()} >= {'config.json', 'README.md'}
    assert zoo.main(['--check', '--manifest', str(manifest), '--docs', str(doc)]) == 0
