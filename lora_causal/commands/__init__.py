"""Commands that are more than a call into the layers below: `bench`, `inspect` and `generate`."""
