def test_a_saved_model_config_keeps_its_fingerprint(tmp_path):
    """save_pretrained writes dtype and architectures into a live config; the fingerprint ignores them."""
    from kvstudio.core.models.loading import load_model
    from kvstudio.core.persist.fingerprint import config_sha256

    loaded = load_model("tiny-llama")
    before = config_sha256(loaded.model.config)
    loaded.model.save_pretrained(tmp_path)
    assert config_sha256(loaded.model.config) == before == config_sha256(load_model("tiny-llama").model.config)
