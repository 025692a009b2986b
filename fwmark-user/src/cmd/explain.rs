//! `fwmark explain`: one packet through the reference model, in words.

use anyhow::Result;
use fwmark::live;
use fwmark_common::Link;
use fwmark_core::explain::{self, Input};

use crate::cli::ExplainArgs;

pub fn explain(args: ExplainArgs) -> Result<()> {
    let input = Input::from_args(
        &args.packet,
        args.hex.as_deref(),
        args.later_fragment,
        &args.vlan,
    )?;
    let loaded = live::read_config(&args.config)?;
    let link = if args.l3 { Link::L3 } else { Link::Ethernet };
    print!(
        "{}",
        explain::explain_on(&loaded.config, link, &input.bytes_on(link), args.mark)
    );
    Ok(())
}
