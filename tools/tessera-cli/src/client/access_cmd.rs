//! Access that fits clinical work (issue 19), straight to the keyserver as
//! the `--as` identity: `tessera standing create|list|update|revoke`,
//! `tessera break-glass`, `tessera break-glass-setting`, `tessera review`,
//! `tessera grants`, and the live feed behind `tessera requests --watch`.
//! The keyserver decides; these commands only ask and print.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tessera_proto::keyserver::v1 as pb;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_tls::Channel;

use super::requests_view::{request_json, requests_table};
use super::{
    ConnArgs, OutputArgs, PAGE_SIZE, Service, Table, all_pages, block_on, owner_uri,
    parse_duration, short_identity, status_error, utc,
};

async fn client(conn: &ConnArgs) -> Result<KeyServerClient<Channel>> {
    Ok(
        KeyServerClient::new(conn.channel(Service::Keyserver).await?)
            .max_decoding_message_size(64 * 1024)
            .max_encoding_message_size(64 * 1024),
    )
}

/// `tessera standing ...`: approvals granted in advance.
#[derive(Subcommand, Debug, Clone)]
pub enum StandingCmd {
    /// Approve in advance: requests of an identity (or role / group) for a
    /// purpose, on your studies (all, or --study ...), until it expires.
    Create(StandingCreateArgs),
    /// Your standing approvals.
    List(StandingListArgs),
    /// Change the expiry or the budget of one.
    Update(StandingUpdateArgs),
    /// Revoke one: grants it approved stop releasing keys at once.
    Revoke(StandingIdArgs),
}

#[derive(Args, Debug, Clone)]
pub struct StandingCreateArgs {
    /// Approve this identity (a user name or a full identity)...
    #[arg(
        long,
        value_name = "IDENTITY",
        conflicts_with = "role",
        required_unless_present = "role"
    )]
    pub to: Option<String>,
    /// ...or every holder of this role or member of this group.
    #[arg(long, value_name = "ROLE")]
    pub role: Option<String>,
    /// The access purpose it covers (treatment, research, audit, ...).
    #[arg(long)]
    pub purpose: String,
    /// Only these studies (repeatable); none: all your studies.
    #[arg(long = "study", value_name = "STUDY_ID")]
    pub studies: Vec<String>,
    /// How long the approval lasts (30d, 12h, ...).
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Most requests it approves (none: no limit).
    #[arg(long, value_name = "N")]
    pub budget: Option<u32>,
    /// Lifetime of each grant it approves (default 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub grant_ttl: Option<Duration>,
    /// Uses of each grant it approves (default 1).
    #[arg(long, value_name = "N")]
    pub grant_uses: Option<u32>,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct StandingListArgs {
    /// Also list revoked and expired approvals.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct StandingUpdateArgs {
    /// The approval (sa-...).
    pub approval_id: String,
    /// New lifetime from now.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// New remaining budget.
    #[arg(long, value_name = "N", conflicts_with = "no_budget")]
    pub budget: Option<u32>,
    /// Remove the budget (no limit).
    #[arg(long)]
    pub no_budget: bool,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct StandingIdArgs {
    /// The approval (sa-...).
    pub approval_id: String,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct BreakGlassArgs {
    /// The study (st-...).
    pub study: String,
    /// Why (required; kept for the review).
    #[arg(long)]
    pub reason: String,
    /// A patient attribute the study's key is bound to, NAME=VALUE (repeatable).
    #[arg(long = "attr", value_name = "NAME=VALUE", required = true)]
    pub attrs: Vec<String>,
    /// Key purpose label.
    #[arg(long, default_value = "pixels")]
    pub key_purpose: String,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct BreakGlassSettingArgs {
    /// Forbid break-glass on your studies...
    #[arg(long, conflicts_with = "enable", required_unless_present = "enable")]
    pub disable: bool,
    /// ...or allow it again.
    #[arg(long)]
    pub enable: bool,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ReviewArgs {
    /// Mark this break-glass use (rq-...) reviewed instead of listing.
    #[arg(long, value_name = "REQUEST_ID")]
    pub mark: Option<String>,
    /// Also list uses already reviewed.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct GrantsArgs {
    /// Grants on your studies (as owner) instead of your own.
    #[arg(long)]
    pub owner: bool,
    /// Also list expired, used-up and revoked grants.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

fn standing_json(s: &pb::StandingApproval) -> Value {
    json!({
        "approval_id": s.approval_id,
        "owner": s.owner,
        "grantee_identity": s.grantee_identity,
        "grantee_role": s.grantee_role,
        "access_purpose": s.access_purpose,
        "study_ids": s.study_ids,
        "created_at_unix": s.created_at_unix,
        "expires_at_unix": s.expires_at_unix,
        "budget_left": s.has_budget.then_some(s.budget_left),
        "grant_ttl_seconds": s.grant_ttl_seconds,
        "grant_uses": s.grant_uses,
        "approvals_made": s.approvals_made,
        "revoked": s.revoked,
    })
}

fn standing_table(list: &[pb::StandingApproval]) -> Table {
    let mut t = Table::new([
        "APPROVAL", "TO", "PURPOSE", "STUDIES", "BUDGET", "MADE", "EXPIRES", "STATE",
    ]);
    for s in list {
        let to = if s.grantee_role.is_empty() {
            short_identity(&s.grantee_identity).to_owned()
        } else {
            format!("role:{}", s.grantee_role)
        };
        t.row([
            s.approval_id.clone(),
            to,
            s.access_purpose.clone(),
            if s.study_ids.is_empty() {
                "all".into()
            } else {
                s.study_ids.join(",")
            },
            if s.has_budget {
                s.budget_left.to_string()
            } else {
                "-".into()
            },
            s.approvals_made.to_string(),
            utc(s.expires_at_unix),
            if s.revoked { "revoked" } else { "live" }.into(),
        ]);
    }
    t
}

fn one_standing(out: &OutputArgs, verb: &str, s: Option<pb::StandingApproval>) -> Result<()> {
    let s = s.ok_or_else(|| anyhow!("{verb}: the keyserver answered without the approval"))?;
    out.emit(&standing_json(&s), || {
        println!("{verb} {}", s.approval_id);
        print!("{}", standing_table(std::slice::from_ref(&s)).render());
    })
}

/// `tessera standing ...`.
pub fn standing(cmd: StandingCmd) -> Result<()> {
    block_on(async move {
        match cmd {
            StandingCmd::Create(a) => {
                let r = client(&a.conn)
                    .await?
                    .create_standing_approval(a.conn.request(pb::CreateStandingApprovalRequest {
                        grantee_identity: a.to.as_deref().map(owner_uri).unwrap_or_default(),
                        grantee_role: a.role.clone().unwrap_or_default(),
                        access_purpose: a.purpose.clone(),
                        study_ids: a.studies.clone(),
                        ttl_seconds: a.ttl.as_secs(),
                        budget: a.budget.unwrap_or(0),
                        grant_ttl_seconds: a.grant_ttl.map_or(0, |d| d.as_secs()),
                        grant_uses: a.grant_uses.unwrap_or(0),
                    }))
                    .await
                    .map_err(|s| status_error("create standing approval", &s))?;
                one_standing(&a.out, "created", r.into_inner().approval)
            }
            StandingCmd::List(a) => {
                let mut ks = client(&a.conn).await?;
                let list = all_pages(async |page_token| {
                    let page = ks
                        .list_standing_approvals(a.conn.request(pb::ListStandingApprovalsRequest {
                            include_inactive: a.all,
                            page_size: PAGE_SIZE,
                            page_token,
                        }))
                        .await
                        .map_err(|s| status_error("list standing approvals", &s))?
                        .into_inner();
                    Ok((page.approvals, page.next_page_token))
                })
                .await?;
                a.out
                    .emit_list(&list, standing_json, "no standing approvals", |list| {
                        print!("{}", standing_table(list).render());
                    })
            }
            StandingCmd::Update(a) => {
                if a.ttl.is_none() && a.budget.is_none() && !a.no_budget {
                    bail!("say what changes: --ttl, --budget or --no-budget");
                }
                let r = client(&a.conn)
                    .await?
                    .update_standing_approval(a.conn.request(pb::UpdateStandingApprovalRequest {
                        approval_id: a.approval_id.clone(),
                        ttl_seconds: a.ttl.map_or(0, |d| d.as_secs().max(1)),
                        budget: a.budget.unwrap_or(0),
                        clear_budget: a.no_budget,
                    }))
                    .await
                    .map_err(|s| status_error("update standing approval", &s))?;
                one_standing(&a.out, "updated", r.into_inner().approval)
            }
            StandingCmd::Revoke(a) => {
                let r = client(&a.conn)
                    .await?
                    .revoke_standing_approval(a.conn.request(pb::RevokeStandingApprovalRequest {
                        approval_id: a.approval_id.clone(),
                    }))
                    .await
                    .map_err(|s| status_error("revoke standing approval", &s))?;
                one_standing(&a.out, "revoked", r.into_inner().approval)
            }
        }
    })
}

/// `tessera break-glass`.
pub fn break_glass(a: BreakGlassArgs) -> Result<()> {
    let mut attributes = Vec::new();
    for kv in &a.attrs {
        let (name, value) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--attr {kv:?}: expected NAME=VALUE"))?;
        attributes.push(pb::Attribute {
            name: name.to_owned(),
            value: value.to_owned(),
        });
    }
    block_on(async move {
        let r = client(&a.conn)
            .await?
            .break_glass(a.conn.request(pb::BreakGlassRequest {
                study_id: a.study.clone(),
                attributes,
                purpose: a.key_purpose.clone(),
                reason: a.reason.clone(),
                on_behalf_of: String::new(),
            }))
            .await
            .map_err(|s| status_error("break glass", &s))?
            .into_inner()
            .request
            .ok_or_else(|| anyhow!("break glass: the keyserver answered without the grant"))?;
        a.out.emit(&request_json(&r), || {
            println!(
                "BREAK-GLASS {}: study {} open for {} use(s) until {}; the owner is told and will review it",
                r.request_id,
                r.study_id,
                r.uses_left,
                utc(r.expires_at_unix)
            );
        })
    })
}

/// `tessera break-glass-setting`.
pub fn break_glass_setting(a: BreakGlassSettingArgs) -> Result<()> {
    block_on(async move {
        let disabled = client(&a.conn)
            .await?
            .set_break_glass(a.conn.request(pb::SetBreakGlassRequest {
                disabled: a.disable,
            }))
            .await
            .map_err(|s| status_error("break-glass setting", &s))?
            .into_inner()
            .disabled;
        a.out.emit(&json!({"break_glass_disabled": disabled}), || {
            if disabled {
                println!("break-glass is now disabled on your studies");
            } else {
                println!("break-glass is now allowed on your studies");
            }
        })
    })
}

/// `tessera review`.
pub fn review(a: ReviewArgs) -> Result<()> {
    block_on(async move {
        let mut ks = client(&a.conn).await?;
        if let Some(id) = &a.mark {
            let r = ks
                .mark_reviewed(a.conn.request(pb::MarkReviewedRequest {
                    request_id: id.clone(),
                }))
                .await
                .map_err(|s| status_error("mark reviewed", &s))?
                .into_inner()
                .request
                .ok_or_else(|| anyhow!("mark reviewed: no request in the answer"))?;
            return a.out.emit(&request_json(&r), || {
                println!("reviewed {}", r.request_id);
            });
        }
        let list = all_pages(async |page_token| {
            let page = ks
                .list_break_glass(a.conn.request(pb::ListBreakGlassRequest {
                    include_reviewed: a.all,
                    page_size: PAGE_SIZE,
                    page_token,
                }))
                .await
                .map_err(|s| status_error("list break-glass uses", &s))?
                .into_inner();
            Ok((page.requests, page.next_page_token))
        })
        .await?;
        a.out.emit_list(
            &list,
            request_json,
            "no break-glass uses to review",
            |list| {
                let mut t = Table::new(["REQUEST", "STUDY", "BY", "WHEN", "REASON", "REVIEWED"]);
                for r in list {
                    t.row([
                        r.request_id.clone(),
                        r.study_id.clone(),
                        short_identity(&r.requester).to_owned(),
                        utc(r.created_at_unix),
                        r.break_glass_reason.clone(),
                        if r.reviewed_by.is_empty() {
                            "no".to_owned()
                        } else {
                            format!("by {}", short_identity(&r.reviewed_by))
                        },
                    ]);
                }
                print!("{}", t.render());
            },
        )
    })
}

/// `tessera grants`.
pub fn grants(a: GrantsArgs) -> Result<()> {
    block_on(async move {
        let mut ks = client(&a.conn).await?;
        let list = all_pages(async |page_token| {
            let page = ks
                .list_grants(a.conn.request(pb::ListGrantsRequest {
                    as_owner: a.owner,
                    include_spent: a.all,
                    page_size: PAGE_SIZE,
                    page_token,
                }))
                .await
                .map_err(|s| status_error("list grants", &s))?
                .into_inner();
            Ok((page.grants, page.next_page_token))
        })
        .await?;
        let grant_json = |g: &pb::Grant| {
            let mut v = g.request.as_ref().map(request_json).unwrap_or(Value::Null);
            v["valid"] = json!(g.valid);
            v["expiring_soon"] = json!(g.expiring_soon);
            v["seconds_left"] = json!(g.seconds_left);
            v
        };
        a.out.emit_list(&list, grant_json, "no grants", |list| {
            let mut t = Table::new([
                "REQUEST",
                "STUDY",
                "REQUESTER",
                "PURPOSE",
                "USES LEFT",
                "EXPIRES",
                "STATE",
                "VIA",
            ]);
            for g in list {
                let Some(r) = &g.request else { continue };
                let state = if g.expiring_soon {
                    format!("EXPIRING SOON ({}s)", g.seconds_left)
                } else if g.valid {
                    "valid".to_owned()
                } else {
                    "spent".to_owned()
                };
                let via = if r.break_glass {
                    "break-glass".to_owned()
                } else if !r.standing_approval.is_empty() {
                    r.standing_approval.clone()
                } else {
                    "owner".to_owned()
                };
                t.row([
                    r.request_id.clone(),
                    r.study_id.clone(),
                    short_identity(&r.requester).to_owned(),
                    r.access_purpose.clone(),
                    format!("{}/{}", r.uses_left, r.uses_granted),
                    utc(r.expires_at_unix),
                    state,
                    via,
                ]);
            }
            print!("{}", t.render());
        })
    })
}

/// `tessera requests --watch`: prints requests (as owner) or decisions (as
/// requester, `mine`) as the keyserver commits them, until interrupted or
/// `limit` events were printed.
pub async fn watch(
    conn: &ConnArgs,
    out: &OutputArgs,
    mine: bool,
    limit: Option<u64>,
) -> Result<()> {
    let mut stream = client(conn)
        .await?
        .watch_requests(conn.request(pb::WatchRequestsRequest { as_owner: !mine }))
        .await
        .map_err(|s| status_error("watch requests", &s))?
        .into_inner();
    if !out.json {
        eprintln!(
            "watching {} (Ctrl-C to stop)",
            if mine {
                "decisions on your requests"
            } else {
                "requests on your studies"
            }
        );
    }
    let mut seen = 0u64;
    while let Some(ev) = stream
        .message()
        .await
        .map_err(|s| status_error("watch requests", &s))?
    {
        let Some(r) = ev.request else { continue };
        let mut v = request_json(&r);
        v["event"] = json!(ev.kind);
        out.emit(&v, || {
            println!("{}: {}", ev.kind, r.request_id);
            print!("{}", requests_table(std::slice::from_ref(&r)).render());
        })?;
        seen += 1;
        if limit.is_some_and(|l| seen >= l) {
            break;
        }
    }
    Ok(())
}
