//! The `tessera` binary's integration tests, one test binary (each links
//! the whole suite: fewer binaries, faster CI). The kit is in `common`.

mod common;

mod access_cli;
mod cli;
mod dicom_client;
mod first_hour;
mod keyserver_client;
