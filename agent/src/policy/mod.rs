//! Policy: targets and rules from YAML files, and the pure decision function. (Stub: lands with issue 6.)
