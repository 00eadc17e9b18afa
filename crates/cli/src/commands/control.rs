//! `cancel` and `retry`.

use super::*;

/// `cancel SELECTOR...`.
pub(super) async fn cancel(db: &BatchDb, selectors: Vec<String>) -> Result<ExitCode> {
    for s in selectors {
        let sel: Selector = s.parse()?;
        let done = db.cancel(&sel).await?;
        if done.is_empty() {
            return Err(Error::InstanceNotFound(format!(
                "{sel} (pending or running)"
            )));
        }
        for i in done {
            line(format_args!("cancel {} {}", i.job, i.created))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `retry SELECTOR... | --all-failed [--with-dependents]`.
pub(super) async fn retry(
    db: &BatchDb,
    selectors: Vec<String>,
    all_failed: bool,
    with_dependents: bool,
) -> Result<ExitCode> {
    let sels: Vec<Selector> = if all_failed {
        vec![Selector::AllFailed]
    } else {
        selectors.iter().map(|s| s.parse()).collect::<Result<_>>()?
    };
    for sel in sels {
        let pushed = db.retry(&sel, with_dependents).await?;
        if pushed.is_empty() && sel != Selector::AllFailed {
            return Err(Error::InstanceNotFound(format!(
                "{sel} (failed or cancelled)"
            )));
        }
        for i in pushed {
            line(format_args!("pushed {} {}", i.job, i.created))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
