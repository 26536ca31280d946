"""What users hand to usp, read without trusting it: files opened without following links or
blocking (``safe_files``), the kind of a folder and whether its Hugging Face files ask for code
(``folders``), a model config's sizes (``model_size``), a local tokenizer (``tokenizer``), byte-level
tokens (``byte_tokens``) and content fingerprints (``fingerprint``). Every layer that reads input
uses these; they import nothing of the layers above."""
