"""The third-party internals the code relies on, one small module per library, each checked by
tests/test_thirdparty_internals.py so that an upgrade that changes them fails loudly there, not silently elsewhere."""
