//! Every list RPC pages (issue 20): delegates, standing approvals,
//! break-glass uses and the gateway's FindGrants each list more entries
//! than one small page holds, page by page, every entry once, in the same
//! order as one big page, and every page under the message limit.

use tessera_proto::keyserver::v1 as pb;
use tonic::Code;

use crate::common::*;

/// Follows every page of `$call` (a client method) with requests built by
/// `$req(page_size, token)`, collecting `$field` mapped by `$id`; returns
/// (entries, pages).
macro_rules! all_pages {
    ($client:expr, $call:ident, $req:expr, $field:ident, $id:expr, $size:expr) => {{
        let mut got = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = $client
                .$call($req($size, std::mem::take(&mut token)))
                .await
                .unwrap()
                .into_inner();
            pages += 1;
            assert!(prost::Message::encoded_len(&page) <= 64 * 1024);
            assert!(page.$field.len() <= $size as usize);
            got.extend(page.$field.into_iter().map($id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
            assert!(pages < 100, "paging does not end");
        }
        (got, pages)
    }};
}

#[tokio::test]
async fn every_list_rpc_pages() {
    let env = Env::start().await;
    let mut owner = env.client("owner").await;

    // Delegates: 25, in identity order.
    let mut want: Vec<String> = (0..25)
        .map(|i| format!("spiffe://tessera.local/user/delegate-{i:02}"))
        .collect();
    for d in &want {
        owner
            .add_delegate(pb::AddDelegateRequest {
                delegate: d.clone(),
            })
            .await
            .unwrap();
    }
    want.sort();
    let req = |page_size, page_token| pb::ListDelegatesRequest {
        page_size,
        page_token,
    };
    let (small, pages) = all_pages!(owner, list_delegates, req, delegates, |d| d, 7u32);
    assert_eq!(pages, 4);
    assert_eq!(small, want);

    // Standing approvals: 12, oldest first.
    for _ in 0..12 {
        owner
            .create_standing_approval(pb::CreateStandingApprovalRequest {
                grantee_identity: CLIN.into(),
                access_purpose: "treatment".into(),
                ttl_seconds: 3600,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let req = |page_size, page_token| pb::ListStandingApprovalsRequest {
        include_inactive: true,
        page_size,
        page_token,
    };
    let id = |a: pb::StandingApproval| a.approval_id;
    let (small, pages) = all_pages!(owner, list_standing_approvals, req, approvals, id, 5u32);
    let (big, one) = all_pages!(owner, list_standing_approvals, req, approvals, id, 500u32);
    assert_eq!((pages, one, small.len()), (3, 1, 12));
    assert_eq!(small, big);

    // Break-glass uses: 9, newest first; each is a grant FindGrants lists.
    let study = register(&env, "P-1").await;
    let mut clin = env.client("clinician").await;
    for i in 0..9 {
        clin.break_glass(pb::BreakGlassRequest {
            study_id: study.clone(),
            attributes: attrs("P-1"),
            purpose: "pixels".into(),
            reason: format!("emergency {i}"),
            on_behalf_of: String::new(),
        })
        .await
        .unwrap();
    }
    let req = |page_size, page_token| pb::ListBreakGlassRequest {
        include_reviewed: true,
        page_size,
        page_token,
    };
    let id = |r: pb::KeyRequest| r.request_id;
    let (small, pages) = all_pages!(owner, list_break_glass, req, requests, id, 4u32);
    let (big, _) = all_pages!(owner, list_break_glass, req, requests, id, 500u32);
    assert_eq!((pages, small.len()), (3, 9));
    assert_eq!(small, big);

    let mut gateway = env.client("gateway").await;
    let req = |page_size, page_token| pb::FindGrantsRequest {
        on_behalf_of: CLIN.into(),
        study_id: study.clone(),
        page_size,
        page_token,
    };
    let id = |g: pb::FoundGrant| g.request_id;
    let (small, pages) = all_pages!(gateway, find_grants, req, grants, id, 4u32);
    let (big, _) = all_pages!(gateway, find_grants, req, grants, id, 500u32);
    assert_eq!((pages, small.len()), (3, 9));
    assert_eq!(small, big);

    // A token the keyserver never gave, and an over-size page, are refused.
    let e = owner
        .list_break_glass(pb::ListBreakGlassRequest {
            page_token: "12:sa-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = owner
        .list_delegates(pb::ListDelegatesRequest {
            page_size: 501,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    env.stop().await;
}
