//! tessera-scp over real sockets: `scu::send_files` / `scu::echo` as the
//! client wherever a well-behaved SCU is enough, dicom-ul's client driven
//! by hand where a test needs to misbehave, and a hand-made SCP (dicom-ul's
//! server) that misbehaves towards the SCU.
//!
//! Instances: small data sets built here, plus a few real files from
//! pydicom-data in several transfer syntaxes (found through
//! TESSERA_DICOM_DATA or the project's .venv; the test fails without them).
//!
//! * [`scp_side`]: tessera-scp's SCP against well- and ill-behaved clients;
//! * [`scu_side`]: tessera-scp's SCU against bad input and bad SCPs;
//! * [`common`]: the fixtures both use.

mod common;
mod scp_side;
mod scu_side;
