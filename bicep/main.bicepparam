// The default: three regions, pay-as-you-go only (billed per token; nothing is billed for the model deployments
// while idle). uksouth serves at priority 1; swedencentral and francecentral at priority 2 take the overflow when
// uksouth is throttled or failing. Models, versions and SKUs are current ones offered in these regions according to
// bicep/azure-openai-models.json (dated; tests/test_bicep.py checks every deployment here against it), and none needs
// a registration: gpt-5.4-mini and text-embedding-3-small deploy on any subscription with quota (gpt-5.4 and other
// limited-access models only on subscriptions Microsoft approved: https://aka.ms/oai/gpt5access). Check your
// quota before deploying (docs/deploy.md). Other scenarios: minimal.bicepparam, existing-accounts.bicepparam,
// private.bicepparam; what each costs at rest: docs/deploy.md#what-it-costs-at-rest.
using './main.bicep'

// azd sets AZURE_ENV_NAME; with az deployment group create, export it or keep the default.
param environmentName = readEnvironmentVariable('AZURE_ENV_NAME', 'aigw')

// The admin who runs `python -m shared.admin` (Storage Table Data Contributor, Monitoring Reader). azd passes
// AZURE_PRINCIPAL_ID (whoever runs it) but not its type; azure.yaml's preprovision hook (tools/azd_principal.py) sets
// AZURE_PRINCIPAL_TYPE (User, or ServicePrincipal when azd is signed in as one), so by default the deployer becomes
// the admin. With no type known, no admin: a wrong type would fail the deployment (UnmatchedPrincipalType).
// GATEWAY_ADMIN_PRINCIPAL_ID names someone else (with GATEWAY_ADMIN_PRINCIPAL_TYPE: User, Group or
// ServicePrincipal; default Group), or 'none' for no admin.
var adminOverride = readEnvironmentVariable('GATEWAY_ADMIN_PRINCIPAL_ID', '')
var deployerType = readEnvironmentVariable('AZURE_PRINCIPAL_TYPE', '')
param adminPrincipalId = adminOverride == 'none' ? '' : (empty(adminOverride) ? (empty(deployerType) ? '' : readEnvironmentVariable('AZURE_PRINCIPAL_ID', '')) : adminOverride)
// The console's sign-in with Entra ID (App Service Authentication): the app registration's client id, from
// `azd env set GATEWAY_CONSOLE_CLIENT_ID <id>`; unset, the console takes the admin key (docs/deploy.md).
param consoleSignInClientId = readEnvironmentVariable('GATEWAY_CONSOLE_CLIENT_ID', '')
param adminPrincipalType = empty(adminOverride) ? (empty(deployerType) ? 'User' : deployerType) : readEnvironmentVariable('GATEWAY_ADMIN_PRINCIPAL_TYPE', 'Group')

param backendRegions = [
  {
    id: 'uksouth'
    location: 'uksouth'
    priority: 1
    weight: 1
    // GlobalStandard: billed per token, processed in any Azure region; capacity in thousands of tokens per minute.
    deployments: [
      {
        name: 'gpt-5.4-mini'
        model: 'gpt-5.4-mini'
        modelVersion: '2026-03-17'
        sku: 'GlobalStandard'
        capacity: 200
      }
      {
        name: 'text-embedding-3-small'
        model: 'text-embedding-3-small'
        modelVersion: '1'
        sku: 'GlobalStandard'
        capacity: 120
      }
    ]
  }
  {
    id: 'swedencentral'
    location: 'swedencentral'
    priority: 2
    weight: 1
    // DataZoneStandard: processed within the EU data zone. gpt-5.4-mini is not offered as DataZoneStandard here
    // (bicep/azure-openai-models.json), so that deployment is GlobalStandard.
    deployments: [
      {
        name: 'gpt-5.4-mini'
        model: 'gpt-5.4-mini'
        modelVersion: '2026-03-17'
        sku: 'GlobalStandard'
        capacity: 200
      }
      {
        name: 'text-embedding-3-small'
        model: 'text-embedding-3-small'
        modelVersion: '1'
        sku: 'DataZoneStandard'
        capacity: 120
      }
    ]
  }
  {
    id: 'francecentral'
    location: 'francecentral'
    priority: 2
    weight: 1
    deployments: [
      {
        name: 'gpt-5.4-mini'
        model: 'gpt-5.4-mini'
        modelVersion: '2026-03-17'
        sku: 'GlobalStandard'
        capacity: 200
      }
      {
        name: 'text-embedding-3-small'
        model: 'text-embedding-3-small'
        modelVersion: '1'
        sku: 'DataZoneStandard'
        capacity: 120
      }
    ]
  }
]

// Provisioned throughput (PTU) is opt-in: PTUs are billed by the hour whether used or not (a 15-PTU global
// deployment runs to thousands of US dollars a month at list price, docs/deploy.md) and PTU quota is not granted by
// default. With quota (or a reservation) in hand, replace the empty list with, for example, this backend, which
// then serves first (priority 1, the pay-as-you-go regions above taking its overflow at priority 2). gpt-5.4 needs a
// registration (no model that needs none is offered as GlobalProvisionedManaged and current in the snapshot); the
// comment line in it tells `python -m tools.bicepcheck` your subscription is approved. An existing account's PTU
// deployments go here too (existingAccount and the deployment names only): they are then paced and alerted on.
//
// param provisionedBackendRegions = [
//   {
//     id: 'uksouth-ptu'
//     location: 'uksouth'
//     priority: 1
//     weight: 1
//     // Tokens of the reported remaining capacity kept for high-priority consumers.
//     reserveTokens: 20000
//     deployments: [
//       // bicepcheck: registered gpt-5.4
//       {
//         name: 'gpt-5.4'
//         model: 'gpt-5.4'
//         modelVersion: '2026-03-05'
//         sku: 'GlobalProvisionedManaged'
//         capacity: 15
//       }
//     ]
//   }
// ]
//
// and set the uksouth region above to priority 2.
param provisionedBackendRegions = []

param limitFailMode = 'open'
param maximumInstanceCount = 40
param alwaysReadyInstances = 1
param enablePrivateNetworking = false
