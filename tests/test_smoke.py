def test_finished_run_has_checkpoint_and_metrics(finished_run):
    store, run = finished_run
    assert run.status == "finished", run.error
    keys = {m.key for m in store.metrics(run.id)}
    assert {"train/loss", "val/acc", "lr", "train/step_loss"} <= keys
    stages = {m.stage for m in store.metrics(run.id, keys=["val/acc"])}
    assert stages == {1, 2}
    assert run.test_acc is not None and run.best_checkpoint
