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

/// Studies per Repair call.
const REPAIR_PAGE: u32 = 200;

/// Adds one page's answer to the running total (its token replaces the last).
fn add_page(total: &mut pb::RepairResponse, page: pb::RepairResponse) {
    total.studies += page.studies;
    total.objects += page.objects;
    total.fragments_checked += page.fragments_checked;
    total.fragments_missing += page.fragments_missing;
    total.fragments_corrupt += page.fragments_corrupt;
    total.fragments_unreachable += page.fragments_unreachable;
    total.fragments_rebuilt += page.fragments_rebuilt;
    total.fragments_moved += page.fragments_moved;
    total.interrupted_finished += page.interrupted_finished;
    total.orphans_removed += page.orphans_removed;
    total.failures.extend(page.failures);
    total.actions.extend(page.actions);
    total.next_page_token = page.next_page_token;
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
        // Every study, a page of them per call (each answer's actions and
        // failures stay under the message limit), added up.
        let mut client = gateway(conn).await?;
        let mut r = pb::RepairResponse::default();
        let mut token = String::new();
        loop {
            let page = client
                .repair(conn.request(pb::RepairRequest {
                    study_handle: study.clone().unwrap_or_default(),
                    dry_run,
                    evacuate_node: evacuate.clone(),
                    page_size: REPAIR_PAGE,
                    page_token: token.clone(),
                }))
                .await;
            let page = match page {
                Ok(p) => p.into_inner(),
                Err(s) => {
                    bar.finish_and_clear();
                    return Err(status_error("repair", &s));
                }
            };
            add_page(&mut r, page);
            if r.next_page_token.is_empty() || r.next_page_token == token {
                break;
            }
            token = r.next_page_token.clone();
        }
        bar.finish_and_clear();
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
