import hashlib

from runner import lock


def test_read_pins_and_differences(tmp_path):
    f = tmp_path / "requirements.lock"
    f.write_text("# a comment\ntorch==2.13.0\nHydra_Core==1.3.2\nsome.pkg==1.0 ; python_version<'4'\n-e ./local\n")
    pins = lock.read_pins(f)
    assert pins == {"torch": "2.13.0", "hydra-core": "1.3.2", "some-pkg": "1.0"}
    installed = {"torch": "2.13.0+cpu", "hydra-core": "1.3.3"}  # some-pkg is an extra this env lacks
    assert lock.differences(pins, installed) == {"hydra-core": "installed 1.3.3, locked 1.3.2"}


def test_this_environment_is_the_locked_one():
    """`make setup` installs from the lock, so the suite runs on exactly the locked versions."""
    status = lock.lock_status()
    assert status["lock_sha256"] == hashlib.sha256(lock.LOCK_FILE.read_bytes()).hexdigest()
    assert status["differs"] == {} and status["matches_lock"] is True
    assert lock.read_pins()["torch"] == "2.13.0"
