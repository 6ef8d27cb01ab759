// cbor-x loads this inside a try block and decodes in JavaScript when it throws.
throw new Error("cbor-extract is not installed: cbor-x decodes in JavaScript");
