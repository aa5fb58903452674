"""Input and output of quantized models in other engines' formats."""
