"""The text path (issue 14): a local Hugging Face encoder as theta_0, text heads, ``prepare --modality text`` and
the benchmark's text workspace. Needs the ``nlu`` extra (``pip install 'pyro-tvc[nlu]'``)."""
