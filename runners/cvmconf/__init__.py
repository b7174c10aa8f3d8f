"""cvmconf runner: discovers the suite binaries, runs them, and reports conformance against the
requirement catalogue (suites/requirements.yaml)."""
