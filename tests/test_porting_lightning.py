"""Lightning checkpoints: the LightningModule built from its hyper_parameters, as load_from_checkpoint does."""
import pytest
import pytorch_lightning as pl
import torch
from click.testing import CliRunner
from torch import nn

import ckptfit
from ckptfit.cli import main


class Lit(pl.LightningModule):
    def __init__(self, hidden=8, classes=3, lr=0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class LitConfig(pl.LightningModule):
    """Takes its hyper-parameters as one object: Lightning records hparams_name='config'."""

    def __init__(self, config):
        super().__init__()
        self.save_hyperparameters(config)
        self.net = nn.Sequential(nn.Linear(4, config["hidden"]), nn.ReLU(), nn.Linear(config["hidden"], 3))

    forward, training_step = Lit.forward, Lit.training_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module, path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(path)
    return module


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("lit")
    torch.manual_seed(1)
    lit = _fit(Lit(hidden=6, classes=5), d / "last.ckpt")
    cfg = _fit(LitConfig({"hidden": 7}), d / "config.ckpt")
    return d, lit.eval(), cfg.eval()


def _same(a, b):
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-6)


def test_build_names_the_class_and_gets_the_hyper_parameters(fitted):
    d, lit, _ = fitted
    model, report = ckptfit.build(Lit, d / "last.ckpt")
    assert (model.hparams.hidden, model.hparams.classes) == (6, 5)
    _same(model, lit)
    _same(model, Lit.load_from_checkpoint(d / "last.ckpt").eval())
    assert report.model == ("test_porting_lightning.Lit (hyper_parameters recorded in the checkpoint (hidden=6, "
                            "classes=5, lr=0.1), as load_from_checkpoint)")
    with pytest.raises(ckptfit.LoadError, match=r"shape"):  # built without them, the shapes differ: refused
        ckptfit.build(lambda: Lit(), d / "last.ckpt")


def test_hyper_parameters_under_hparams_name(fitted):
    d, _, cfg = fitted
    ckpt = torch.load(d / "config.ckpt", weights_only=False)
    assert ckpt["hparams_name"] == "config"
    model, report = ckptfit.build(LitConfig, d / "config.ckpt")
    _same(model, cfg)
    _same(model, LitConfig.load_from_checkpoint(d / "config.ckpt").eval())
    assert "(config={'hidden': 7})" in report.model


def test_cli_model_spec_naming_the_class(fitted, monkeypatch):
    d, lit, _ = fitted
    out = d / "cli.safetensors"
    r = CliRunner().invoke(main, ["load", str(d / "last.ckpt"), "--model", "test_porting_lightning:Lit",
                                  "--save", str(out)])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    saved = load_file(out)
    assert all(torch.equal(saved[k], v) for k, v in lit.state_dict().items())
    # the user's own --model-arg wins over the saved one, as load_from_checkpoint's keyword arguments do
    r = CliRunner().invoke(main, ["load", str(d / "last.ckpt"), "--model", "test_porting_lightning:Lit",
                                  "--model-arg", "hidden=9"])
    assert r.exit_code == 1 and "shape" in r.output


def test_recorded_class_path_is_imported_only_with_trust(fitted, tmp_path):
    d, lit, _ = fitted
    ckpt = torch.load(d / "last.ckpt", weights_only=False)
    ckpt["hyper_parameters"]["_class_path"] = "test_porting_lightning.Lit"  # as LightningCLI records it
    path = tmp_path / "cli.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ckptfit.CheckpointError, match=r"records its LightningModule class "
                                                      r"'test_porting_lightning\.Lit'; building it imports"):
        ckptfit.from_checkpoint(path)
    model, report = ckptfit.from_checkpoint(path, trust=True)
    _same(model, lit)
    assert report.model.startswith("test_porting_lightning.Lit(hidden=6, classes=5, lr=0.1) (recorded in")


class Widths:
    """A hyper-parameter object of the user's own class: the restricted reader keeps it inert."""

    def __init__(self, hidden):
        self.hidden = hidden


class LitObj(pl.LightningModule):
    def __init__(self, widths=None):
        super().__init__()
        self.save_hyperparameters()
        widths = widths or Widths(8)
        self.net = nn.Sequential(nn.Linear(4, widths.hidden), nn.ReLU(), nn.Linear(widths.hidden, 3))

    forward, training_step = Lit.forward, Lit.training_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_hyper_parameters_holding_objects_need_trust(tmp_path):
    lit = _fit(LitObj(Widths(5)), tmp_path / "obj.ckpt").eval()
    with pytest.raises(ckptfit.CheckpointError, match=r"the checkpoint's hyper_parameters hold objects of "
                                                      r"test_porting_lightning\.Widths, which ckptfit keeps inert") as e:
        ckptfit.build(LitObj, tmp_path / "obj.ckpt")
    assert "pass trust=True (CLI: --trust)" in str(e.value)
    model, _ = ckptfit.build(LitObj, tmp_path / "obj.ckpt", trust=True)
    _same(model, lit)
