from loraplex.tenancy.keys import generate_key, hash_secret, parse_key, verify


def test_generate_parse_roundtrip() -> None:
    prefix, secret, full = generate_key()
    assert full == f"lpx_{prefix}_{secret}"
    assert parse_key(full) == (prefix, secret)
    assert generate_key()[2] != full


def test_hash_is_keyed_and_verifies() -> None:
    _, secret, _ = generate_key()
    h = hash_secret("k" * 32, secret)
    assert len(h) == 64 and h != hash_secret("j" * 32, secret)
    assert verify("k" * 32, secret, h)
    assert not verify("k" * 32, secret + "x", h)
    assert not verify("j" * 32, secret, h)


def test_parse_rejects_malformed() -> None:
    prefix, secret, _ = generate_key()
    for bad in [
        "",
        "sk-abc",
        f"lpx_{prefix}",
        f"lpx_{prefix}_",
        f"xyz_{prefix}_{secret}",
        f"lpx_{prefix.upper()}_{secret}",
        f"lpx_{prefix}0_{secret}",
        f"lpx_{prefix}_{secret} ",
        f"lpx_{prefix}_{'a' * 300}",
    ]:
        assert parse_key(bad) is None, bad
