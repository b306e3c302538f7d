//! `tessera repair status|run` and `tessera node drain|replace NAME`: the
//! gateway's scrub and repair of erasure-coded fragments (admin role).

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use tessera_proto::gateway::v1 as pb;

use super::gateway_cmd::gateway;
use super::{ConnArgs, OutputArgs, block_on, status_error};

#[derive(Subcommand, Debug)]
pub enum RepairCmd {
    /// Scrub only: re-hash every fragment on its node and report what is
    /// missing, corrupt or unreachable (changes nothing).
    Status(RepairArgs),
    /// Scrub and rebuild every missing or corrupt fragment from the others.
    Run(RepairArgs),
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Move every fragment off storage node NAME (rebuilt on other nodes),
    /// e.g. before taking it out of service.
    Drain(NodeArgs),
    /// After NAME was replaced by a new, empty node (same name and
    /// address): rebuild the fragments it held onto it.
    Replace(NodeArgs),
}

#[derive(Args, Debug)]
pub struct RepairArgs {
    /// Only this study (st-...); default every study.
    #[arg(long)]
    pub study: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// The storage node's name (e.g. storage-4).
    pub name: String,
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub out: OutputArgs,
}

pub fn repair(cmd: RepairCmd) -> Result<()> {
    match cmd {
        RepairCmd::Status(a) => call(&a.conn, &a.out, a.study.clone(), true, String::new()),
        RepairCmd::Run(a) => call(&a.conn, &a.out, a.study.clone(), false, String::new()),
    }
}

pub fn node(cmd: NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::Drain(a) => call(&a.conn, &a.out, None, false, a.name.clone()),
        NodeCmd::Replace(a) => call(&a.conn, &a.out, None, false, String::new()),
    }
}

fn call(
    conn: &ConnArgs,
    out: &OutputArgs,
    study: Option<String>,
    dry_run: bool,
    evacuate: String,
) -> Result<()> {
    block_on(async move {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(if dry_run {
            "scrubbing every fragment on its node"
        } else {
            "scrubbing and repairing"
        });
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        let r = gateway(conn)
            .await?
            .repair(conn.request(pb::RepairRequest {
                study_handle: study.unwrap_or_default(),
                dry_run,
                evacuate_node: evacuate,
            }))
            .await;
        bar.finish_and_clear();
        let r = r.map_err(|s| status_error("repair", &s))?.into_inner();
        let value = json!({
            "studies": r.studies, "objects": r.objects,
            "fragments_checked": r.fragments_checked,
            "fragments_missing": r.fragments_missing,
            "fragments_corrupt": r.fragments_corrupt,
            "fragments_unreachable": r.fragments_unreachable,
            "fragments_rebuilt": r.fragments_rebuilt,
            "fragments_moved": r.fragments_moved,
            "interrupted_finished": r.interrupted_finished,
            "orphans_removed": r.orphans_removed,
            "failures": r.failures, "actions": r.actions,
        });
        out.emit(&value, || {
            println!(
                "{} studies, {} objects, {} fragments checked: {} missing, {} corrupt, {} unreachable",
                r.studies,
                r.objects,
                r.fragments_checked,
                r.fragments_missing,
                r.fragments_corrupt,
                r.fragments_unreachable
            );
            if !dry_run {
                println!(
                    "rebuilt {} fragment(s), moved {}; {} interrupted store(s) rolled back, {} orphan object(s) removed",
                    r.fragments_rebuilt, r.fragments_moved, r.interrupted_finished, r.orphans_removed
                );
            }
            for a in &r.actions {
                println!("  {a}");
            }
            for f in &r.failures {
                println!("  FAILED: {f}");
            }
        })?;
        if !r.failures.is_empty() {
            bail!(
                "repair: {} object(s) could not be brought back to full redundancy",
                r.failures.len()
            );
        }
        Ok(())
    })
}
